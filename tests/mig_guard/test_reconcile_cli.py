"""`mig-guard reconcile` usage errors exit 2 with a message, before touching any cluster or GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

BASE = [sys.executable, "-m", "mig_guard.cli", "reconcile", "--node-name", "n1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--mig-config-file", "c.yaml", "--simulated-gpus", "NVIDIA-A100-SXM4-40GB:2"],
            "--simulated-* options need --gpu-backend simulated",
        ),
        (
            [
                "--gpu-backend",
                "simulated",
                "--simulated-gpus",
                "NVIDIA-A100-SXM4-40GB:x",
                "--mig-config-file",
                "c.yaml",
            ],
            "NVIDIA-A100-SXM4-40GB:x",
        ),
        (
            [
                "--gpu-backend",
                "simulated",
                "--simulated-gpus",
                "NVIDIA-A100-SXM4-40GB:1",
                "--mig-config-file",
                "c.yaml",
                "--metrics-listen",
                "9100",
            ],
            "expected HOST:PORT",
        ),
        (["--configmap", "c.yaml", "--mig-config-file", "c.yaml"], "not allowed with"),
        ([], "one of the arguments --configmap --mig-config-file is required"),
        (
            ["--mig-config-file", "c.yaml", "--rollout-budget", "2"],
            "--rollout-budget needs --rollout-namespace",
        ),
        (
            ["--mig-config-file", "c.yaml", "--rollout-budget", "0%", "--rollout-namespace", "mg"],
            "a percentage from 1% to 100%",
        ),
        (
            [
                "--mig-config-file",
                "c.yaml",
                "--rollout-budget",
                "2",
                "--rollout-namespace",
                "mg",
                "--rollout-failure-limit",
                "-1",
            ],
            "--rollout-failure-limit: 0 (never stop) or more",
        ),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    done = subprocess.run([*BASE, *args], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
