"""Cleaning up after a killed real node, without starting one: the recorded processes are usually
gone by the time the next session looks (a killed run, a restarted machine)."""

from __future__ import annotations

import os
import subprocess
import sys

from devcluster.node import kill_recorded_processes


def test_a_recorded_process_that_is_gone_is_skipped_not_an_error() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()

    assert kill_recorded_processes({"containerd": proc.pid}) == []


def test_a_live_process_that_reused_the_pid_under_another_name_is_left_alone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert kill_recorded_processes({"kubelet": proc.pid}) == []
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_live_recorded_process_is_killed_with_its_group() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    name = os.path.basename(os.readlink(f"/proc/{proc.pid}/exe"))
    try:
        assert kill_recorded_processes({name: proc.pid}) == [f"killed stale {name} ({proc.pid})"]
        assert proc.wait(timeout=10) < 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
