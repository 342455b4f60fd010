"""Shared pytest configuration. Fixtures of each area live in plugin modules registered here."""

import pytest

# --- devcluster (issue 3): control_plane, k8s_api, kubeconfig, workload_plane, kubectl -------------
pytest_plugins = ["devcluster.pytest_plugin"]
# ---------------------------------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The chart's tests run helm, a cluster tool built with the control plane (`make binaries`):
    every test that uses it is marked `cluster`, so `make unit` runs without it."""
    for item in items:
        if "helm_binary" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
