"""The project on a real node: the image from the real Dockerfile (buildah, no registry), and the
chart installed with helm. The node itself is devcluster's `real_node` fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from devcluster.images import ImageArchive, build_dockerfile, debian_base_image
from devcluster.node import RealNode

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mig-guard"
#: Also in the Makefile (`make node-prep` builds it ahead, so the tests find it cached).
MIG_GUARD_IMAGE = "mig-guard.local/mig-guard:dev"


@pytest.fixture(scope="session")
def mig_guard_image(real_node: RealNode) -> ImageArchive:
    """./Dockerfile built on the local Debian base (cached by content), imported into the node."""
    image = build_dockerfile(REPO, MIG_GUARD_IMAGE, debian_base_image())
    real_node.import_image(image)
    return image
