"""`mig-guard plan`, run as a user runs it (a subprocess), on the GPU Operator's default config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import migcore

DEFAULT_CONFIG = str(Path(migcore.__file__).parent / "data" / "default-mig-parted-config.yaml")
A100 = "NVIDIA-A100-SXM4-40GB"
OPS = {"create-gi", "destroy-gi", "create-ci", "destroy-ci", "set-mig-mode", "reset-gpu"}


def plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mig_guard", "plan", "--config", DEFAULT_CONFIG, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_json_plan_replaces_only_what_differs() -> None:
    done = plan("--simulated-gpus", f"{A100}:2", "--from", "all-balanced", "--to", "all-1g.5gb", "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert [g["index"] for g in body["gpus"]] == [0, 1]
    for gpu in body["gpus"]:
        ops = [op["op"] for op in gpu["operations"]]
        assert set(ops) <= OPS and "reset-gpu" not in ops and "set-mig-mode" not in ops
        # all-balanced already holds two 1g.5gb: they stay, five more are created.
        assert ops.count("create-gi") == 5 and ops.count("destroy-gi") == 2
        created = [op for op in gpu["operations"] if op["op"] == "create-gi"]
        assert all(op["profile"] == "1g.5gb" and isinstance(op["start"], int) for op in created)


def test_mode_change_plans_a_reset_per_gpu_and_identical_configs_plan_nothing() -> None:
    done = plan(
        "--simulated-gpus",
        f"{A100}:1,NVIDIA-H100-80GB-HBM3:1",
        "--from",
        "all-disabled",
        "--to",
        "all-balanced",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    for gpu in json.loads(done.stdout)["gpus"]:
        assert [op["op"] for op in gpu["operations"][:2]] == ["set-mig-mode", "reset-gpu"]
        assert gpu["operations"][0]["enabled"] is True
    same = plan("--simulated-gpus", f"{A100}:3", "--from", "all-3g.20gb", "--to", "all-3g.20gb", "--json")
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout) == {"gpus": [{"index": i, "operations": []} for i in range(3)]}


def test_text_plan_reads_as_steps_per_gpu() -> None:
    done = plan("--simulated-gpus", f"{A100}:2", "--from", "all-balanced", "--to", "all-disabled")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "all-balanced -> all-disabled: 2 of 2 GPUs change, 20 operations, 2 GPU resets"
    assert lines[1].startswith("GPU 0: 2g.10gb@0, 1g.5gb@2, 1g.5gb@3, 3g.20gb@4 -> MIG disabled")
    assert "  destroy-gi 3g.20gb@4" in lines and "  set-mig-mode disabled" in lines


def test_refusals_and_usage_errors_have_distinct_exit_codes() -> None:
    wrong_profile = plan("--simulated-gpus", f"{A100}:1", "--from", "all-disabled", "--to", "all-2g.20gb")
    assert wrong_profile.returncode == 1
    assert "2g.20gb does not exist on A100-40GB" in wrong_profile.stderr
    unknown_name = plan("--simulated-gpus", f"{A100}:1", "--from", "all-disabled", "--to", "all-everything")
    assert unknown_name.returncode == 1 and "all-everything" in unknown_name.stderr
    bad_gpus = plan("--simulated-gpus", "A100", "--from", "all-disabled", "--to", "all-balanced")
    assert bad_gpus.returncode == 2 and "--simulated-gpus" in bad_gpus.stderr
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "mig_guard",
            "plan",
            "--config",
            "/nonexistent.yaml",
            "--simulated-gpus",
            f"{A100}:1",
            "--from",
            "a",
            "--to",
            "b",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2
