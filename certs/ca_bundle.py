"""Put the CA bundle into the ``caBundle`` of every webhook of the webhook configurations.

A JSON patch per configuration, each replacement guarded by a ``test`` of the webhook's name at
that index, so a configuration edited between our read and our patch is never half-updated.
Webhooks whose ``caBundle`` already matches are left alone (no write at all when nothing differs).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from kubernetes import client as k8s
from kubernetes.client import ApiException

HTTP_NOT_FOUND = 404
HTTP_UNPROCESSABLE = 422
PATCH_RETRIES = 5
#: Shown in managedFields (Argo CD `managedFieldsManagers`).
FIELD_MANAGER = "mig-guard-certs"


class Kind(Enum):
    VALIDATING = "ValidatingWebhookConfiguration"
    MUTATING = "MutatingWebhookConfiguration"


class PatchOutcome(Enum):
    PATCHED = "patched"
    UNCHANGED = "unchanged"
    MISSING = "missing"


@dataclass(frozen=True)
class PatchResult:
    kind: Kind
    name: str
    outcome: PatchOutcome
    webhooks_patched: int = 0


class CABundleError(RuntimeError):
    """A webhook configuration that could not be patched."""


def patch_operations(webhooks: Sequence[Any], bundle_b64: str) -> list[dict[str, Any]]:
    """JSON-patch operations that set ``caBundle`` on every webhook that lacks exactly ``bundle_b64``."""
    ops: list[dict[str, Any]] = []
    for index, hook in enumerate(webhooks):
        client_config = hook.client_config
        if client_config is not None and client_config.ca_bundle == bundle_b64:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{index}/name", "value": hook.name})
        ops.append({"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": bundle_b64})
    return ops


class CABundlePatcher:
    """Patches Validating and Mutating webhook configurations by name."""

    def __init__(self, api_client: Any) -> None:
        self._api: Any = k8s.AdmissionregistrationV1Api(api_client)

    def patch(self, names: Sequence[str], bundle_pem: bytes) -> list[PatchResult]:
        """For each name, patch the Validating and the Mutating configuration of that name if present."""
        bundle_b64 = base64.b64encode(bundle_pem).decode("ascii")
        return [self._patch_one(kind, name, bundle_b64) for name in names for kind in Kind]

    def _read(self, kind: Kind, name: str) -> Any:
        try:
            if kind is Kind.VALIDATING:
                return self._api.read_validating_webhook_configuration(name)
            return self._api.read_mutating_webhook_configuration(name)
        except ApiException as exc:
            if exc.status == HTTP_NOT_FOUND:
                return None
            raise

    def _send(self, kind: Kind, name: str, ops: list[dict[str, Any]]) -> None:
        if kind is Kind.VALIDATING:
            self._api.patch_validating_webhook_configuration(name, ops, field_manager=FIELD_MANAGER)
        else:
            self._api.patch_mutating_webhook_configuration(name, ops, field_manager=FIELD_MANAGER)

    def _patch_one(self, kind: Kind, name: str, bundle_b64: str) -> PatchResult:
        for _ in range(PATCH_RETRIES):
            config = self._read(kind, name)
            if config is None:
                return PatchResult(kind, name, PatchOutcome.MISSING)
            ops = patch_operations(config.webhooks or [], bundle_b64)
            if not ops:
                return PatchResult(kind, name, PatchOutcome.UNCHANGED)
            try:
                self._send(kind, name, ops)
            except ApiException as exc:
                # 422: a `test` failed because the webhooks changed since our read; read again.
                if exc.status == HTTP_UNPROCESSABLE:
                    continue
                if exc.status == HTTP_NOT_FOUND:
                    return PatchResult(kind, name, PatchOutcome.MISSING)
                raise
            return PatchResult(kind, name, PatchOutcome.PATCHED, webhooks_patched=len(ops) // 2)
        raise CABundleError(f"{kind.value} {name} kept changing while we patched its caBundle")
