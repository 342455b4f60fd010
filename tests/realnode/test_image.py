"""The project's real Dockerfile, built without a registry (buildah, a local Debian base image as
the PYTHON_IMAGE build argument, pip from a local wheelhouse, no network) and run on the real node:
it runs as the non-root user 65532 with `mig-guard` as its entry point."""

from __future__ import annotations

from devcluster import oci
from devcluster.images import ImageArchive
from devcluster.node import RealNode


def test_the_image_declares_its_user_and_entry_point(mig_guard_image: ImageArchive) -> None:
    config = oci.image_config(mig_guard_image.path)["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["mig-guard"]
    assert config["Cmd"] == ["--help"]


def test_the_image_runs_mig_guard_help_by_default(real_node: RealNode, mig_guard_image: ImageArchive) -> None:
    phase, log = real_node.run_pod(mig_guard_image.name)
    assert phase == "Succeeded", log
    assert log.startswith("usage: mig-guard"), log
    for command in ("webhook", "reconcile", "certs", "check"):
        assert command in log


def test_the_container_runs_as_the_image_user_not_root(
    real_node: RealNode, mig_guard_image: ImageArchive
) -> None:
    script = "import os, shutil; print(os.getuid(), os.getgid(), shutil.which('mig-guard'))"
    phase, log = real_node.run_pod(mig_guard_image.name, command=["python", "-c", script])
    assert phase == "Succeeded", log
    assert log.split() == ["65532", "65532", "/opt/mig-guard/bin/mig-guard"]
