"""Fixtures of the webhook tests: the shipped mig-parted config, rules, certificates, and the real
webhook deployed on the session's API server."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from cluster_webhook import (
    CONFIGMAP,
    CONFIGMAP_WARN,
    RECONCILER_USER,
    Deployment,
    deployed,
    wait_active,
)
from webhook_harness import TestAuthority

from devcluster.pytest_plugin import KubectlRunner
from kube.config_source import ConfigMapRef, ConfigView
from migcore.catalog import load_catalog
from migcore.config import load_config_file
from webhook.node_hardware import HardwareResolver
from webhook.validation import NodeRules

RECONCILER = "system:serviceaccount:mig-guard:reconciler"


@pytest.fixture(scope="session")
def default_config_file() -> Path:
    return Path(str(resources.files("migcore") / "data" / "default-mig-parted-config.yaml"))


@pytest.fixture(scope="session")
def config_view(default_config_file: Path) -> ConfigView:
    return ConfigView(
        load_config_file(default_config_file, load_catalog()),
        "ConfigMap gpu-operator/default-mig-parted-config",
    )


@pytest.fixture(scope="session")
def resolver() -> HardwareResolver:
    return HardwareResolver(load_catalog())


@pytest.fixture
def rules(resolver: HardwareResolver) -> NodeRules:
    return NodeRules(resolver, [RECONCILER])


@pytest.fixture(scope="session")
def authority() -> TestAuthority:
    return TestAuthority()


# --- the real webhook on the session's API server (tests/webhook/cluster_webhook.py) ----------------


@pytest.fixture(scope="module")
def default_config_text(default_config_file: Path) -> str:
    return default_config_file.read_text()


@pytest.fixture(scope="module")
def deploy(
    k8s_api: Any,
    kubeconfig: Path,
    tmp_path_factory: pytest.TempPathFactory,
    authority: TestAuthority,
    default_config_text: str,
) -> Iterator[Callable[..., Deployment]]:
    """deploy(scope, configmap, *webhook args, reconciler_users=(), workers=2) -> a Deployment of this
    module, torn down with it (see cluster_webhook.deployed)."""
    with contextlib.ExitStack() as stack:

        def make(scope: str, guard: ConfigMapRef, *extra: str, **options: Any) -> Deployment:
            workdir = tmp_path_factory.mktemp(f"webhook-{scope}")
            return stack.enter_context(
                deployed(
                    k8s_api,
                    kubeconfig,
                    workdir,
                    authority,
                    scope,
                    guard,
                    default_config_text,
                    *extra,
                    **options,
                )
            )

        yield make


@pytest.fixture(scope="module")
def taint_webhook(deploy: Callable[..., Deployment]) -> Deployment:
    """The webhook in its default mode: the ConfigMap watched through the API, holds by taint."""
    return deploy("taint", CONFIGMAP, reconciler_users=[RECONCILER_USER])


@pytest.fixture
def webhook(taint_webhook: Deployment, kubectl: KubectlRunner) -> Deployment:
    wait_active(kubectl, taint_webhook)
    return taint_webhook


@pytest.fixture(scope="module")
def cordon_webhook(deploy: Callable[..., Deployment]) -> Deployment:
    """A second server: its own ConfigMap, the guard in warn mode, holds by cordon, one worker."""
    return deploy("cordon", CONFIGMAP_WARN, "--hold", "cordon", "--configmap-guard", "warn", workers=1)
