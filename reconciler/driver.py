"""Whether the NVIDIA driver is ready, and where it lives: the GPU Operator's validation marker.

The operator's validator writes `/run/nvidia/validations/driver-ready` once the driver is loaded
and works, as shell assignments of what it found (cmd/nvidia-validator, `createStatusFile`):

    IS_HOST_DRIVER=true             the driver is installed on the host, not by the driver container
    NVIDIA_DRIVER_ROOT=/run/nvidia/driver   the driver's root on the host ("/" for a host driver)
    NVIDIA_DEV_ROOT=/run/nvidia/driver      where its device nodes are, on the host

The operator's mig-manager waits for that file before its first NVML call, stops host GPU
clients only for a host driver (`WITH_SHUTDOWN_HOST_GPU_CLIENTS=$IS_HOST_DRIVER`), and runs the
driver's tools from its root; the reconciler does the same (`reconciler.loop`, `reconciler.cdi`,
`reconciler.host_clients`).
"""

from __future__ import annotations

import ctypes
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_READY_FILE = "/run/nvidia/validations/driver-ready"
POLL_SECONDS = 5.0
NVML_LIBRARY = "libnvidia-ml.so.1"
# Where a driver root (a distribution's file system) keeps its libraries and tools.
LIB_DIRS = (
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "usr/lib",
)
BIN_DIRS = ("usr/bin", "usr/sbin", "bin", "sbin")


@dataclass(frozen=True)
class DriverInfo:
    """What the marker says. `host_driver` is None when no marker is in use (a node without the
    GPU Operator): nothing is known, and nothing is assumed."""

    host_driver: bool | None = None
    driver_root: str = "/"
    dev_root: str = "/"

    def describe(self) -> str:
        kind = {True: "installed on the host", False: "from the driver container", None: "unknown"}
        return f"driver {kind[self.host_driver]} (root {self.driver_root}, devices under {self.dev_root})"


def parse_driver_ready(text: str) -> DriverInfo:
    """The marker's assignments (unknown keys and malformed lines are ignored: an older or newer
    validator may write other keys; the roots default to the host's `/`)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, raw = line.strip().partition("=")
        if not sep or not name.isidentifier():
            continue
        try:
            words = shlex.split(raw)
        except ValueError:
            continue
        values[name] = words[0] if words else ""
    host = values.get("IS_HOST_DRIVER", "").lower()
    driver_root = values.get("NVIDIA_DRIVER_ROOT") or "/"
    return DriverInfo(
        host_driver=True if host == "true" else False if host == "false" else None,
        driver_root=driver_root,
        dev_root=values.get("NVIDIA_DEV_ROOT") or driver_root,
    )


def read_driver_ready(path: str | Path) -> DriverInfo | None:
    """The marker's content, or None while it does not exist (the driver is not ready)."""
    try:
        return parse_driver_ready(Path(path).read_text(errors="replace"))
    except FileNotFoundError:
        return None


def waiting_reason(path: str | Path) -> str:
    """The node's reason while the marker is missing."""
    return (
        f"waiting for the NVIDIA driver: {path} does not exist yet (the GPU Operator's validator "
        "writes it once the driver is loaded); no GPU is read or changed before"
    )


def find_in_root(root: str | Path, dirs: tuple[str, ...], name: str) -> Path | None:
    """`name` in the first of `dirs` under `root` that has it."""
    for directory in dirs:
        candidate = Path(root) / directory / name
        if candidate.exists():
            return candidate
    return None


def load_nvml(driver_root: str | Path) -> str:
    """Make the driver's NVML library loadable before the first NVML call: the one the NVIDIA
    container runtime put in the container, else the one in the driver's root (mounted into the
    container). It is loaded by full path, so pynvml's load by name finds it already loaded (only
    that library: the driver root's other libraries are another distribution's). Says which."""
    try:
        ctypes.CDLL(NVML_LIBRARY)
        return f"{NVML_LIBRARY} from the container"
    except OSError:
        pass
    found = find_in_root(driver_root, LIB_DIRS, NVML_LIBRARY)
    if found is None:
        return f"no {NVML_LIBRARY} in the container or under {driver_root}"
    try:
        ctypes.CDLL(str(found), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return f"{found} did not load: {exc}"
    log.info("NVML from the driver root: %s", found)
    return str(found)
