"""Kubeconfig files (credentials embedded, base64) and `kubernetes` clients built from them."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kubeconfig_dict(
    server: str,
    ca_pem: bytes,
    *,
    user: str = "admin",
    client_cert_pem: bytes | None = None,
    client_key_pem: bytes | None = None,
    token: str | None = None,
    cluster: str = "mig-guard-dev",
    namespace: str | None = None,
) -> dict[str, Any]:
    """A one-cluster, one-user kubeconfig (as a dict) whose current context is ``<user>@<cluster>``."""
    if (client_cert_pem is None) != (client_key_pem is None):
        raise ValueError("client certificate and key go together")
    if token is None and client_cert_pem is None:
        raise ValueError("a kubeconfig user needs a client certificate or a token")
    creds: dict[str, str] = {}
    if client_cert_pem is not None and client_key_pem is not None:
        creds["client-certificate-data"] = _b64(client_cert_pem)
        creds["client-key-data"] = _b64(client_key_pem)
    if token is not None:
        creds["token"] = token
    context_name = f"{user}@{cluster}"
    context: dict[str, str] = {"cluster": cluster, "user": user}
    if namespace is not None:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [
            {"name": cluster, "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)}}
        ],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": context_name, "context": context}],
        "current-context": context_name,
    }


def write_kubeconfig(path: Path, config: dict[str, Any]) -> Path:
    """Write a kubeconfig with mode 0600 (it holds credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_kubeconfig(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a kubeconfig")
    return data


def api_client(path: Path) -> Any:
    """A ``kubernetes.client.ApiClient`` for the kubeconfig's current context."""
    return k8s_config.new_client_from_config(config_file=str(path))  # type: ignore[no-untyped-call]


def token_client(base: Any, token: str) -> Any:
    """A ``kubernetes.client.ApiClient`` for the same server as ``base`` (an ApiClient), bearer token auth."""
    cfg = k8s_client.Configuration()
    cfg.host = base.configuration.host
    cfg.ssl_ca_cert = base.configuration.ssl_ca_cert
    cfg.verify_ssl = True
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    return k8s_client.ApiClient(cfg)
