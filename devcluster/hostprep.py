"""The Debian packages a real node (:mod:`devcluster.node`) and the image builds need, installed
with apt-get when missing.

Only root can run a kubelet with containerd, so only root installs: anyone else gets a message
naming the missing packages (and the tests that need them fail saying so).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

#: What must be on the host -> the Debian (bookworm) package that provides it.
REQUIRED: dict[str, str] = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "/usr/lib/cni/host-local": "containernetworking-plugins",
    "/usr/lib/cni/loopback": "containernetworking-plugins",
    "iptables": "iptables",
    "ip6tables": "iptables",
    "iptables-save": "iptables",
    # kube-proxy clears UDP conntrack entries of deleted Services with it.
    "conntrack": "conntrack",
    # Deletes the nftables tables iptables-nft created, so a stopped node leaves none behind.
    "nft": "nftables",
    "ip": "iproute2",
    # Image builds: a Debian root file system without a registry, and the project's Dockerfile.
    "mmdebstrap": "mmdebstrap",
    "buildah": "buildah",
}


def is_root() -> bool:
    return os.geteuid() == 0


def _present(thing: str) -> bool:
    if thing.startswith("/"):
        return Path(thing).exists()
    return shutil.which(thing) is not None


def missing_packages() -> list[str]:
    """The Debian packages to install (sorted, without duplicates)."""
    return sorted({pkg for thing, pkg in REQUIRED.items() if not _present(thing)})


class HostPrepError(RuntimeError):
    """The host lacks something a real node needs and it cannot be installed here."""


def ensure_packages(quiet: bool = False) -> float:
    """Install the missing packages with apt-get (root only); returns the seconds spent."""
    t0 = time.monotonic()
    missing = missing_packages()
    if not missing:
        return 0.0
    if not is_root():
        raise HostPrepError(
            f"a real node needs the Debian packages {', '.join(missing)} (and root to run it): "
            f"run `sudo apt-get install -y {' '.join(missing)}`, or run the tests as root"
        )
    if shutil.which("apt-get") is None:
        raise HostPrepError(f"missing packages {', '.join(missing)} and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = subprocess.DEVNULL if quiet else None
    if not quiet:
        print(f"  apt-get install {' '.join(missing)}", flush=True)
    # The package lists of a fresh machine may be stale or empty: update first, once.
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, stdout=out)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        env=env,
        check=True,
        stdout=out,
    )
    still = missing_packages()
    if still:
        raise HostPrepError(f"still missing after apt-get install: {', '.join(still)}")
    return time.monotonic() - t0
