"""A test host root: a directory the reconciler `chroot`s into as it does into a GPU node's `/host`,
whose `systemctl`, `nvidia-ctk` and `nvidia-smi` are stand-ins. The real ones need a driver, a GPU
and the host's systemd; the stand-ins record their arguments (one line per call, in call order,
across all of them), keep the state that matters (which units run, the CDI spec written) and fail
or block on demand. Everything else is real: the `chroot` (root needed), the shell, the paths.

The root holds the build machine's `dash`, `cat`, `rm` and `sleep` with the shared libraries they
load, so the stand-ins are plain shell scripts:

    root = HostRootFixture.build(tmp_path / "host", units={"nvidia-dcgm.service": True})
    root.fail("nvidia-ctk", "cannot write the spec")   # the next calls of nvidia-ctk exit 1
    root.fail("systemctl-stop", "Access denied")        # only `systemctl stop ...` fails
    root.block("nvidia-ctk")                            # calls wait until `root.unblock("nvidia-ctk")`
    root.calls()                                       # ["systemctl is-active nvidia-dcgm.service", ...]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

LOG = "run/stand-ins/calls.log"
FAIL_DIR = "etc/stand-ins/fail"
BLOCK_DIR = "etc/stand-ins/block"
UNITS_DIR = "run/stand-ins/units"
TOOLS = ("dash", "cat", "rm", "sleep")
TOOLKIT_DIR = "usr/local/nvidia/toolkit"

# Shared by every stand-in: record the call, then fail or wait when told to.
_PRELUDE = """#!/bin/sh
name=%(name)s
printf '%%s\\n' "$name $*" >> /%(log)s
while [ -e /%(block)s/$name ]; do sleep 0.05; done
for f in /%(fail)s/$name /%(fail)s/$name-$1; do
  if [ -e "$f" ]; then cat "$f" >&2; exit 1; fi
done
"""

_SYSTEMCTL = """
units=/%(units)s
case "$1" in
  is-active)
    if [ -e $units/$2 ] && [ "$(cat $units/$2)" = active ]; then echo active; exit 0; fi
    echo inactive; exit 3 ;;
  stop) [ -e $units/$2 ] && printf 'inactive\\n' > $units/$2; exit 0 ;;
  start)
    if [ ! -e $units/$2 ]; then echo "Failed to start $2: Unit $2 not found." >&2; exit 5; fi
    printf 'active\\n' > $units/$2; exit 0 ;;
  reboot) exit 0 ;;
esac
echo "systemctl stand-in: $1 is not modelled" >&2
exit 1
"""

_NVIDIA_CTK = """
for arg in "$@"; do
  case "$arg" in
    --output=*) out=${arg#--output=} ;;
  esac
done
if [ -n "$out" ]; then printf '# management CDI spec (stand-in)\\n# nvidia-ctk %%s\\n' "$*" > "$out"; fi
exit 0
"""

_NVIDIA_SMI = """
exit 0
"""


def _libraries(binary: Path) -> list[Path]:
    """The shared libraries `binary` loads (its ELF interpreter too), from `ldd`."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
    found = [Path(m) for m in re.findall(r"(/\S+\.so[.\d]*)", out)]
    return [p for p in found if p.exists()]


def _copy_into(root: Path, path: Path) -> None:
    target = root / str(path).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        shutil.copy2(path.resolve(), target)


def install_tools(root: Path) -> None:
    """The shell and the few tools the stand-ins use, with their libraries, into `root` (a
    directory that can then be chrooted into: `/bin/sh` is dash)."""
    for tool in TOOLS:
        found = shutil.which(tool)
        if found is None:
            raise RuntimeError(f"{tool} not found on this machine; the test host root needs it")
        binary = Path(found)
        _copy_into(root, binary)
        for library in _libraries(binary):
            _copy_into(root, library)
        link = root / "bin" / tool
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists() and not link.is_symlink():
            os.symlink(str(binary), link)
    sh = root / "bin" / "sh"
    if not sh.exists():
        os.symlink("dash", sh)


@dataclass
class HostRootFixture:
    """A built test host root (see the module docstring)."""

    root: Path
    driver: Path | None = None  # a driver container's root inside it (its own chroot), if any
    mounted: list[Path] = field(default_factory=list)  # mounts `build` made, innermost last

    @staticmethod
    def build(
        root: Path,
        *,
        units: Mapping[str, bool] = {},
        driver_root: str = "/",
        cdi_spec: bool = True,
        host_mounts: bool = False,
    ) -> HostRootFixture:
        """A host with the given systemd units (True: running), the toolkit where the GPU Operator
        installs it, `nvidia-smi` in the driver root (`/`: a host driver; another path: a driver
        container's root, itself a chroot-able directory) and, with `cdi_spec`, the toolkit's CDI
        spec (so `--cdi auto` finds CDI in use). With `host_mounts`, mounted as a host is, for a pod
        that mounts it: the root a shared mount (a `HostToContainer` mount of it needs one), `/run`
        a tmpfs of its own (writable under a read-only mount of the root, the chart's `/host`).
        `close()` unmounts them."""
        root.mkdir(parents=True, exist_ok=True)
        install_tools(root)
        fixture = HostRootFixture(root)
        if host_mounts:
            fixture._mount(["--bind", str(root), str(root)], root)
            subprocess.run(["mount", "--make-rshared", str(root)], check=True)
            (root / "run").mkdir(exist_ok=True)
            fixture._mount(["-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root / "run")], root / "run")
        for directory in (FAIL_DIR, BLOCK_DIR, UNITS_DIR, "run/cdi", "dev", "tmp"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        (root / "var").mkdir(exist_ok=True)
        if not (root / "var/run").is_symlink():
            os.symlink("/run", root / "var/run")  # as on most hosts: an absolute link, the host's
        (root / LOG).touch()
        fixture.script("usr/bin/systemctl", "systemctl", _SYSTEMCTL)
        fixture.script(f"{TOOLKIT_DIR}/nvidia-ctk", "nvidia-ctk", _NVIDIA_CTK)
        fixture.script(f"{TOOLKIT_DIR}/nvidia-cdi-hook", "nvidia-cdi-hook", "\nexit 0\n")
        driver = root / driver_root.lstrip("/")
        if driver != root:
            fixture.driver = driver
            install_tools(driver)
            for directory in (FAIL_DIR, BLOCK_DIR, str(Path(LOG).parent)):
                (driver / directory).mkdir(parents=True, exist_ok=True)
            os.link(root / LOG, driver / LOG)  # one log, one order, for every stand-in
        fixture.script(f"{driver_root.strip('/')}/usr/bin/nvidia-smi".lstrip("/"), "nvidia-smi", _NVIDIA_SMI)
        if cdi_spec:
            (root / "run/cdi/nvidia.yaml").write_text("# the toolkit's CDI spec (stand-in)\n")
        for unit, running in units.items():
            fixture.set_unit(unit, running)
        return fixture

    def _mount(self, args: list[str], target: Path) -> None:
        subprocess.run(["mount", *args], check=True)
        self.mounted.append(target)

    def close(self) -> None:
        """Unmount what `build` mounted."""
        while self.mounted:
            subprocess.run(["umount", "--lazy", str(self.mounted.pop())], check=True)

    def script(self, path: str, name: str, body: str) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        values = {"name": name, "log": LOG, "block": BLOCK_DIR, "fail": FAIL_DIR, "units": UNITS_DIR}
        target.write_text(_PRELUDE % values + body % values)
        target.chmod(0o755)

    # --- what the test changes ---------------------------------------------------------------------

    def set_unit(self, unit: str, running: bool) -> None:
        (self.root / UNITS_DIR / unit).write_text("active\n" if running else "inactive\n")

    def _roots(self) -> list[Path]:
        return [self.root] if self.driver is None else [self.root, self.driver]

    def fail(self, name: str, message: str = "failed on demand") -> None:
        """Calls of stand-in `name` (or `name-verb`: only those whose first argument is `verb`)
        exit 1 with `message` on stderr, until `heal(name)`."""
        for root in self._roots():
            (root / FAIL_DIR / name).write_text(message + "\n")

    def heal(self, name: str) -> None:
        for root in self._roots():
            (root / FAIL_DIR / name).unlink(missing_ok=True)

    def block(self, name: str) -> None:
        """Calls of stand-in `name` wait (after being recorded) until `unblock(name)`."""
        for root in self._roots():
            (root / BLOCK_DIR / name).touch()

    def unblock(self, name: str) -> None:
        for root in self._roots():
            (root / BLOCK_DIR / name).unlink(missing_ok=True)

    # --- what the test reads -------------------------------------------------------------------------

    def calls(self) -> list[str]:
        """Every stand-in call so far, `name arg ...`, in call order."""
        return (self.root / LOG).read_text().splitlines()

    def running(self, unit: str) -> bool:
        try:
            return (self.root / UNITS_DIR / unit).read_text().strip() == "active"
        except FileNotFoundError:
            return False

    def file(self, host_path: str) -> Path:
        """The host's `host_path` (`/var/run` is the host's link to `/run`: never followed from
        here, where it would name this machine's /run)."""
        path = host_path.lstrip("/")
        if path == "var/run" or path.startswith("var/run/"):
            path = path.removeprefix("var/")
        return self.root / path
