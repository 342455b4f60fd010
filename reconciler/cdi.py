"""CDI: after the GPUs change, containers reach the new MIG devices only once their control
device nodes exist and the management CDI spec names them.

With CDI on (the GPU Operator's default), the NVIDIA runtime gives a container the devices its
CDI spec lists, so after every change of the GPUs, and before the operands come back, the
GPU Operator's mig-manager (`handleCDI`) runs, on the host:

1. `nvidia-smi`, which creates the `nvidia-cap*` device nodes of the new MIG devices;
2. `nvidia-ctk system create-device-nodes --control-devices` (the MIG control devices);
3. `nvidia-ctk cdi generate --mode=management`, written to
   `/var/run/cdi/management.nvidia.com-gpu.yaml`.

`Cdi.refresh` runs the same three commands through `reconciler.host.HostRoot` (chrooted into the
host, so every path is the host's own and the spec needs no root transform). `--cdi auto` turns
this on when the node has an NVIDIA CDI spec already (the toolkit wrote one: CDI is in use).
A refresh that failed is owed (`owed`, kept in the host state directory, so a restarted agent
still owes it) until one succeeds: the loop retries it on its next look.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.driver import BIN_DIRS, LIB_DIRS, NVML_LIBRARY, DriverInfo
from reconciler.host import HostCommandError, HostRoot

log = logging.getLogger(__name__)

CDI_DIRS = ("/var/run/cdi", "/etc/cdi")
MANAGEMENT_SPEC = "/var/run/cdi/management.nvidia.com-gpu.yaml"
# Where the GPU Operator's toolkit installs nvidia-ctk and the CDI hook (toolkit.installDir).
DEFAULT_TOOLKIT_DIR = "/usr/local/nvidia/toolkit"
STALE_FILE = "cdi-stale"


class CdiMode(enum.StrEnum):
    AUTO = "auto"  # on when the node has an NVIDIA CDI spec
    ON = "on"
    OFF = "off"


class CdiError(Exception):
    """Creating the device nodes or the management CDI spec failed; the message says which step."""


def not_usable_yet(layout: str, problem: str) -> str:
    """The reason for a node whose GPUs changed but whose containers cannot use them yet."""
    return (
        f"the GPUs hold {layout} but containers cannot use it yet: {problem}; "
        "mig-guard tries again at its next look (resync or restart)"
    )


@dataclass
class Cdi:
    """The node's CDI devices, refreshed after the GPUs change."""

    host: HostRoot
    mode: CdiMode = CdiMode.AUTO
    driver: DriverInfo = field(default_factory=DriverInfo)
    toolkit_dir: str = DEFAULT_TOOLKIT_DIR
    state_dir: Path | None = None  # where a refresh still owed is remembered
    _owed_here: str | None = None

    # --- whether ----------------------------------------------------------------------------------

    def enabled(self) -> bool:
        if self.mode is CdiMode.AUTO:
            return self.detected()
        return self.mode is CdiMode.ON

    def detected(self) -> bool:
        """An NVIDIA CDI spec on the node (the toolkit's `nvidia.yaml`, a management spec): CDI is
        how this node's containers get GPUs."""
        for directory in CDI_DIRS:
            try:
                names = [p.name for p in self.host.path(directory).iterdir()]
            except OSError:
                continue
            if any("nvidia" in n and n.endswith((".yaml", ".yml", ".json")) for n in names):
                return True
        return False

    # --- owed ---------------------------------------------------------------------------------------

    @property
    def _stale_file(self) -> Path | None:
        return self.state_dir / STALE_FILE if self.state_dir is not None else None

    def owed(self) -> str | None:
        """Why a refresh is still owed (the last failure), or None."""
        path = self._stale_file
        if path is None:
            return self._owed_here
        try:
            return path.read_text() or "an earlier refresh failed"
        except FileNotFoundError:
            return None

    def _owe(self, problem: str | None) -> None:
        path = self._stale_file
        if path is None:
            self._owed_here = problem
        elif problem is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(problem)

    # --- the refresh ----------------------------------------------------------------------------------

    def refresh(self) -> None:
        """The device nodes and the management spec, as mig-manager makes them; raises CdiError
        (and the refresh stays owed) when a step fails."""
        try:
            self._nvidia_smi()
            ctk = self._tool("nvidia-ctk")
            dev_root = self.driver.dev_root
            self.host.run(
                [ctk, "system", "create-device-nodes", "--control-devices", f"--dev-root={dev_root}"]
            )
            generate = [
                ctk,
                "cdi",
                "generate",
                "--mode=management",
                f"--driver-root={self.driver.driver_root}",
                f"--dev-root={dev_root}",
                "--vendor=management.nvidia.com",
                "--class=gpu",
                f"--output={MANAGEMENT_SPEC}",
            ]
            hook = f"{self.toolkit_dir}/nvidia-cdi-hook"
            if self.host.exists(hook):
                generate.insert(-1, f"--nvidia-cdi-hook-path={hook}")
            self.host.run(generate)
        except (HostCommandError, CdiError) as exc:
            problem = f"creating the MIG device nodes and the management CDI spec failed: {exc}"
            self._owe(problem)
            raise CdiError(problem) from exc
        self._owe(None)
        log.info("CDI: device nodes created, %s regenerated", MANAGEMENT_SPEC)

    def _tool(self, name: str) -> str:
        """The toolkit's `name` where the GPU Operator installs it, else the host's PATH."""
        installed = f"{self.toolkit_dir}/{name}"
        return installed if self.host.exists(installed) else name

    def _nvidia_smi(self) -> None:
        """`nvidia-smi` from the driver's root creates the nvidia-cap device nodes. With the
        devices under that root too, it runs chrooted there; otherwise from the host's root with
        the driver's NVML library preloaded (as mig-manager does)."""
        root = self.driver.driver_root
        if root.rstrip("/") == self.driver.dev_root.rstrip("/"):
            self.host.run(["nvidia-smi"], within=root)
            return
        smi = self._find(root, BIN_DIRS, "nvidia-smi")
        library = self._find(root, LIB_DIRS, NVML_LIBRARY)
        self.host.run([smi], env={"LD_PRELOAD": library})

    def _find(self, root: str, dirs: tuple[str, ...], name: str) -> str:
        for directory in dirs:
            candidate = f"{root.rstrip('/')}/{directory}/{name}"
            if self.host.exists(candidate):
                return candidate
        raise CdiError(f"no {name} under the driver root {root} ({', '.join(dirs)})")
