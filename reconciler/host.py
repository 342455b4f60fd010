"""What the agent does to its host: commands run in the host's root filesystem (`chroot`), as the
GPU Operator's mig-manager runs them: the host's systemd (`systemctl`), the NVIDIA Container
Toolkit (`nvidia-ctk`), the driver's `nvidia-smi`, and the one reboot a MIG mode change may need.

The DaemonSet mounts the host's `/` at `/host` (`--host-root`); every host command goes through
`HostRoot.run`, which is also what the tests run, against a test root whose stand-in executables
record their arguments (tests/reconciler/test_host_*.py): the same `chroot`, the same argv.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_HOST_ROOT = "/host"
COMMAND_TIMEOUT_SECONDS = 120.0
REBOOT_GRACE_SECONDS = 600.0
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
SYMLINK_HOPS = 40
# What a failed command's message keeps of its output.
OUTPUT_CHARS = 400


class HostCommandError(Exception):
    """A host command that could not run or exited non-zero; the message names it and its output."""


def _tail(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= OUTPUT_CHARS else "..." + text[-OUTPUT_CHARS:]


@dataclass
class HostRoot:
    """The host's root filesystem as this container sees it (`/host`), and commands run in it."""

    root: Path = field(default_factory=lambda: Path(DEFAULT_HOST_ROOT))
    timeout: float = COMMAND_TIMEOUT_SECONDS
    reboot_grace: float = REBOOT_GRACE_SECONDS

    def path(self, host_path: str) -> Path:
        """Where the host's `host_path` is in this container. Symbolic links are followed inside
        the host's root, as a command chrooted there sees them (`/var/run` -> `/run` on most
        hosts): an absolute link target is the host's, not this container's."""
        parts = [p for p in host_path.split("/") if p]
        resolved: list[str] = []
        hops = 0
        while parts:
            name = parts.pop(0)
            if name == ".":
                continue
            if name == "..":
                if resolved:
                    resolved.pop()
                continue
            here = self.root.joinpath(*resolved, name)
            if here.is_symlink() and hops < SYMLINK_HOPS:
                hops += 1
                target = os.readlink(here)
                if target.startswith("/"):
                    resolved = []
                parts = [p for p in target.split("/") if p] + parts
                continue
            resolved.append(name)
        return self.root.joinpath(*resolved)

    def exists(self, host_path: str) -> bool:
        return self.path(host_path).exists()

    def run(
        self,
        argv: Sequence[str],
        *,
        within: str = "/",
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` chrooted into the host's `within` (`/`: the host's root; the driver root for
        the driver's own tools). Raises HostCommandError when it cannot run, times out, or (with
        `check`) exits non-zero."""
        root = self.path(within)
        what = " ".join(argv)
        environment = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **(env or {})}
        try:
            done = subprocess.run(
                ["chroot", str(root), *argv],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                env=environment,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HostCommandError(f"`{what}` on the host did not finish in {self.timeout:g}s") from exc
        except OSError as exc:
            raise HostCommandError(f"`{what}` could not run on the host: {exc}") from exc
        log.debug("host: %s -> %d", what, done.returncode)
        if check and done.returncode != 0:
            output = _tail(done.stderr + " " + done.stdout) or "no output"
            raise HostCommandError(f"`{what}` on the host exited {done.returncode}: {output}")
        return done

    @staticmethod
    def boot_id() -> str:
        """The host's boot id (the kernel's, the same inside a container): a change that asked for a
        reboot knows from it whether the host has rebooted since; "" when it cannot be read."""
        try:
            return BOOT_ID_FILE.read_text(encoding="ascii").strip()
        except OSError:
            return ""

    def reboot(self) -> None:
        """Reboot the node through the host's systemd, then wait to be stopped: reconciling again
        before the host goes down would judge the mode change as failed. If the host is still up
        after the grace period, the restart path decides."""
        self.run(["systemctl", "reboot"])
        time.sleep(self.reboot_grace)
