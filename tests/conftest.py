"""Shared pytest configuration. Fixtures of each area live in plugin modules registered here."""

# --- devcluster (issue 3): control_plane, k8s_api, kubeconfig, workload_plane, kubectl -------------
pytest_plugins = ["devcluster.pytest_plugin"]
# ---------------------------------------------------------------------------------------------------
