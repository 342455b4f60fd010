"""Read and write the certificate Secrets through the Kubernetes API, idempotently.

A write that would not change anything is not sent, so re-running `mig-guard certs` (every
Helm upgrade, every renewal CronJob tick) leaves the Secrets' resourceVersion alone.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from enum import Enum
from typing import Any

from kubernetes import client as k8s
from kubernetes.client import ApiException

SECRET_TYPE_TLS = "kubernetes.io/tls"  # noqa: S105 - a Secret type, not a password
HTTP_NOT_FOUND = 404
HTTP_CONFLICT = 409
CONFLICT_RETRIES = 5
#: Shown in managedFields, so GitOps tools can ignore what `mig-guard certs` owns.
FIELD_MANAGER = "mig-guard-certs"


class WriteResult(Enum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


class SecretStoreError(RuntimeError):
    """A Secret that cannot be written as asked (for example an existing Secret of another type)."""


def _decode(data: Mapping[str, str] | None) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in (data or {}).items()}


def _encode(data: Mapping[str, bytes]) -> dict[str, bytes | str]:
    return {key: base64.b64encode(value).decode("ascii") for key, value in data.items()}


class SecretStore:
    """Secrets of one namespace, holding PEM data under well-known keys."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self._core: Any = k8s.CoreV1Api(api_client)
        self.namespace = namespace

    def read(self, name: str) -> dict[str, bytes] | None:
        """The Secret's decoded data, or ``None`` if it does not exist."""
        secret = self._get(name)
        return None if secret is None else _decode(secret.data)

    def write(
        self,
        name: str,
        data: Mapping[str, bytes],
        *,
        labels: Mapping[str, str] | None = None,
        secret_type: str = SECRET_TYPE_TLS,
    ) -> WriteResult:
        """Make the Secret hold exactly ``data`` (create or update); labels are added, never removed."""
        for _ in range(CONFLICT_RETRIES):
            secret = self._get(name)
            if secret is None:
                body = k8s.V1Secret(
                    metadata=k8s.V1ObjectMeta(name=name, namespace=self.namespace, labels=dict(labels or {})),
                    type=secret_type,
                    data=_encode(data),
                )
                try:
                    self._core.create_namespaced_secret(self.namespace, body, field_manager=FIELD_MANAGER)
                except ApiException as exc:
                    if exc.status == HTTP_CONFLICT:  # created meanwhile by a parallel run: update it
                        continue
                    raise
                return WriteResult.CREATED
            if secret.type != secret_type:
                raise SecretStoreError(
                    f"Secret {self.namespace}/{name} has type {secret.type}, not {secret_type}; "
                    "delete it or choose another --secret-name"
                )
            current_labels = dict(secret.metadata.labels or {})
            wanted_labels = {**current_labels, **(labels or {})}
            if _decode(secret.data) == dict(data) and wanted_labels == current_labels:
                return WriteResult.UNCHANGED
            secret.data = _encode(data)
            secret.metadata.labels = wanted_labels
            try:
                # replace carries the resourceVersion we read: a concurrent writer makes it fail (409).
                self._core.replace_namespaced_secret(
                    name, self.namespace, secret, field_manager=FIELD_MANAGER
                )
            except ApiException as exc:
                if exc.status == HTTP_CONFLICT:
                    continue
                raise
            return WriteResult.UPDATED
        raise SecretStoreError(f"Secret {self.namespace}/{name} kept changing under us; try again")

    def _get(self, name: str) -> Any:
        try:
            return self._core.read_namespaced_secret(name, self.namespace)
        except ApiException as exc:
            if exc.status == HTTP_NOT_FOUND:
                return None
            raise
