"""A Kubernetes API client for the webhook: from `--kubeconfig`, else in-cluster, else the default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubernetes import client, config


def core_v1(kubeconfig: Path | None) -> Any:
    """A CoreV1Api; built in each gunicorn worker (connection pools do not survive a fork)."""
    if kubeconfig is not None:
        return client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))  # type: ignore[no-untyped-call]
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.CoreV1Api()
