"""Fixtures of the webhook tests: the shipped mig-parted config, rules, certificates."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from webhook_harness import TestAuthority

from migcore.catalog import load_catalog
from migcore.config import load_config_file
from webhook.node_hardware import HardwareResolver
from webhook.validation import ConfigView, NodeRules

RECONCILER = "system:serviceaccount:mig-guard:reconciler"


@pytest.fixture(scope="session")
def default_config_file() -> Path:
    return Path(str(resources.files("migcore") / "data" / "default-mig-parted-config.yaml"))


@pytest.fixture(scope="session")
def config_view(default_config_file: Path) -> ConfigView:
    return ConfigView(
        load_config_file(default_config_file), "ConfigMap gpu-operator/default-mig-parted-config"
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
