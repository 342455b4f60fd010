"""`mig-guard check` and `mig-guard profiles` as other tools call them: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DEFAULT = str(Path(__file__).parents[1] / "data" / "default-mig-parted-config.yaml")
A100 = "NVIDIA-A100-SXM4-40GB"


def mig_guard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mig_guard", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_valid_config_exits_0() -> None:
    done = mig_guard("check", "--config", DEFAULT, "--product", A100, "--gpu-count", "8", "all-balanced")
    assert done.returncode == 0, done.stderr
    assert 'config "all-balanced" is valid for NVIDIA-A100-SXM4-40GB x8' in done.stdout
    assert "GPUs 0-7: 2g.10gb@0, 1g.5gb@2, 1g.5gb@3, 3g.20gb@4" in done.stdout


def test_invalid_config_exits_1_with_the_reason() -> None:
    done = mig_guard("check", "--config", DEFAULT, "--product", "NVIDIA-H100-80GB-HBM3", "all-1g.5gb")
    assert done.returncode == 1
    assert "1g.5gb does not exist on H100-80GB" in done.stdout


def test_json_output() -> None:
    done = mig_guard(
        "check", "--config", DEFAULT, "--product", A100, "--gpu-count", "2", "--json", "all-3g.20gb"
    )
    assert done.returncode == 0
    data = json.loads(done.stdout)
    assert data["name"] == "all-3g.20gb" and data["valid"] is True
    assert data["errors"] == [] and data["warnings"] == []
    assert [g["index"] for g in data["gpus"]] == [0, 1]
    starts = [gi["start"] for gi in data["gpus"][0]["geometry"]["gpuInstances"]]
    assert starts == [0, 4]
    done = mig_guard("check", "--config", DEFAULT, "--product", A100, "--json", "all-7g.80gb")
    assert done.returncode == 1
    data = json.loads(done.stdout)
    assert data["valid"] is False and "7g.80gb does not exist on A100-40GB" in data["errors"][0]


def test_all_configs() -> None:
    done = mig_guard("check", "--config", DEFAULT, "--product", "NVIDIA-A30", "--all", "--json")
    assert done.returncode == 0
    results = json.loads(done.stdout)
    assert len(results) == 81
    valid = [r["name"] for r in results if r["valid"]]
    assert valid == [
        "all-disabled",
        "all-enabled",
        "all-1g.6gb",
        "all-1g.6gb.me",
        "all-2g.12gb",
        "all-2g.12gb.me",
        "all-4g.24gb",
        "all-balanced",
    ]
    table = mig_guard("check", "--config", DEFAULT, "--product", "NVIDIA-A30", "--all")
    assert table.returncode == 0
    assert "8 of 81 configs are valid for NVIDIA-A30" in table.stdout


def test_unknown_product_is_a_usage_error() -> None:
    done = mig_guard("check", "--config", DEFAULT, "--product", "NVIDIA-GeForce-RTX-4090", "all-disabled")
    assert done.returncode == 2
    assert "unknown GPU product" in done.stderr


def test_unreadable_or_broken_config_exits_2(tmp_path: Path) -> None:
    done = mig_guard("check", "--config", str(tmp_path / "none.yaml"), "--product", A100, "x")
    assert done.returncode == 2 and "cannot read" in done.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text('version: v1\nmig-configs:\n  a:\n    - devices: 7\n      device-filter: "0x20B"\n')
    for args in (["a"], ["--all"]):
        done = mig_guard("check", "--config", str(broken), "--product", A100, *args)
        assert done.returncode == 2
        assert 'mig-configs.a[0].device-filter: "0x20B" is not a PCI device id' in done.stderr
        assert "mig-configs.a[0].devices: 7 is not" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["check", "--config", DEFAULT, "--product", A100],
        ["check", "--config", DEFAULT, "--product", A100, "--all", "all-disabled"],
        ["check", "--config", DEFAULT, "--product", A100, "--gpu-count", "-1", "all-disabled"],
        ["check", "--product", A100, "all-disabled"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert mig_guard(*args).returncode == 2


def test_profiles_table() -> None:
    done = mig_guard("profiles", "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0].startswith("RTX-PRO-6000-Blackwell:")
    row = next(line for line in lines if line.startswith("1g.24gb+me.all "))
    assert "{0,3,6,9}:3" in row and " 1 " in row
    done = mig_guard("profiles", "NVIDIA-GB200")
    row = next(line for line in done.stdout.splitlines() if line.startswith("1g.23gb "))
    assert "1g.24gb" in row  # the alias early drivers reported
    assert "* unconfirmed" in done.stdout


def test_profiles_unknown_product() -> None:
    done = mig_guard("profiles", "NVIDIA-GeForce-RTX-4090")
    assert done.returncode == 2 and "unknown GPU product" in done.stderr
