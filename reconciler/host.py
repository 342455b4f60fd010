"""What the agent does to its host: the one reboot a MIG mode change may need (`--reboot-enabled`)."""

from __future__ import annotations

import subprocess
import time

HOST_REBOOT = ("chroot", "/host", "systemctl", "reboot")
REBOOT_GRACE_SECONDS = 600.0


def reboot_host() -> None:
    """Reboot the node through the host's systemd (the DaemonSet mounts the host root at /host),
    then wait to be stopped: reconciling again before the host goes down would judge the mode
    change as failed. If the host is still up after the grace period, the restart path decides."""
    subprocess.run(HOST_REBOOT, check=True)
    time.sleep(REBOOT_GRACE_SECONDS)
