"""`mig-guard hardware` and `mig-guard check --hardware-report` as other tools call them (a real
subprocess), on simulated GPUs: a catalog product and the X100, a GPU no catalog knows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devcluster.helpers import gpu_model_file
from migcore.driver_table import MigTable
from migcore.hardware import NodeGpus

X100 = gpu_model_file("x100.json")
A100 = "NVIDIA-A100-SXM4-40GB"
CONFIG = gpu_model_file("x100-mig-parted-config.yaml")


def mig_guard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mig_guard", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_json_is_exactly_the_annotation_with_one_shared_table() -> None:
    done = mig_guard("hardware", "--simulated-gpu-spec", f"{X100}:2", "--json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1  # one line: the annotation's compact JSON
    report = NodeGpus.from_annotation(done.stdout.strip())
    assert json.loads(done.stdout)["version"] == 2
    assert report.to_annotation() == done.stdout.strip()
    assert [g.name for g in report.gpus] == ["NVIDIA X100", "NVIDIA X100"]
    assert len(json.loads(done.stdout)["migTables"]) == 1
    table = report.gpus[0].mig_table
    assert table is not None
    expected = MigTable.from_json(json.loads(Path(X100).read_text())["migTables"][0])
    assert [(p.name, p.max_count, p.placements) for p in table.profiles] == [
        (p.name, p.max_count, p.placements) for p in expected.profiles
    ]


def test_human_output_shows_each_table_once() -> None:
    done = mig_guard("hardware", "--simulated-gpu-spec", f"{X100}:2")
    assert done.returncode == 0, done.stderr
    assert (
        "GPU 1: NVIDIA X100 (0x2FFF10DE, subsystem 0x1A2B10DE, 98304 MiB), MIG on, no instances"
        in done.stdout
    )
    assert done.stdout.count("driver MIG table of GPU 0, 1") == 1
    assert "3g.48gb  2/11  2    {0,3}:3" in done.stdout


def test_compare_catalog_exit_codes(tmp_path: Path) -> None:
    agrees = mig_guard("hardware", "--simulated-gpus", f"{A100}:1", "--compare-catalog")
    assert agrees.returncode == 0, agrees.stderr
    assert "agrees with the catalog's A100-40GB" in agrees.stdout
    unknown = mig_guard("hardware", "--simulated-gpu-spec", f"{X100}:1", "--compare-catalog")
    assert unknown.returncode == 1
    assert "GPU 0: NVIDIA X100 (0x2FFF10DE) is not in the catalog" in unknown.stdout
    # An A100 whose driver says three 3g.20gb fit: a catalog error (or a new driver) to look at.
    report = json.loads(mig_guard("hardware", "--simulated-gpus", f"{A100}:1", "--json").stdout)
    for profile in report["migTables"][0]["gpuInstanceProfiles"]:
        if profile["name"] == "3g.20gb":
            profile["maxCount"] = 3
    newer = tmp_path / "a100-newer-driver.json"
    newer.write_text(json.dumps(report))
    differs = mig_guard("hardware", "--simulated-gpu-spec", f"{newer}:1", "--compare-catalog")
    assert differs.returncode == 1, differs.stdout + differs.stderr
    assert "disagree:\n  profile 2 (3g.20gb): at most 3; the catalog says 2\n" in differs.stdout


def test_without_a_driver_it_says_so_and_exits_2() -> None:
    done = mig_guard("hardware")
    assert done.returncode == 2
    assert "initialise NVML failed" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["hardware", "--simulated-gpus", f"{A100}:1", "--simulated-gpu-spec", f"{X100}:1"],
        ["hardware", "--json", "--compare-catalog"],
        ["hardware", "--simulated-gpu-spec", "/nonexistent.json:1"],
        ["hardware", "--simulated-gpus", "NVIDIA-A100-SXM4-40GB"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert mig_guard(*args).returncode == 2


def test_check_against_a_hardware_report(tmp_path: Path) -> None:
    config = CONFIG
    report = tmp_path / "report.json"
    report.write_text(mig_guard("hardware", "--simulated-gpu-spec", f"{X100}:2", "--json").stdout)
    ok = mig_guard("check", "--config", str(config), "--hardware-report", str(report), "x100-two-3g")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert 'config "x100-two-3g" is valid for NVIDIA X100 x2\n  GPUs 0-1: 3g.48gb@0, 3g.48gb@3' in ok.stdout
    # 6g profiles are on no catalog GPU: a warning about the file, and a verdict from the driver's
    # table (this report's compute profiles were not read yet: NVML's alignment allows one 3c).
    six = mig_guard("check", "--config", str(config), "--hardware-report", str(report), "x100-two-3c")
    assert six.returncode == 1, six.stdout
    assert (
        'mig-configs.x100-two-3c[0].mig-devices."3c.6g.96gb": profile 3c.6g.96gb exists on no GPU'
        in six.stderr
    )
    bad = mig_guard(
        "check", "--config", str(config), "--hardware-report", str(report), "--json", "x100-three-3g"
    )
    assert bad.returncode == 1
    assert "allows at most 2 of 3g.48gb" in json.loads(bad.stdout)["errors"][0]
    every = mig_guard("check", "--config", str(config), "--hardware-report", str(report), "--all", "--json")
    assert every.returncode == 0
    assert [r["valid"] for r in json.loads(every.stdout)] == [True, False, False]


def test_check_refuses_a_broken_report_or_a_count_beside_it(tmp_path: Path) -> None:
    config = CONFIG
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 3, "gpus": []}')
    done = mig_guard("check", "--config", str(config), "--hardware-report", str(broken), "x100-two-3g")
    assert done.returncode == 2
    assert "expected an object with version 1 or 2" in done.stderr
    missing = mig_guard("check", "--config", str(config), "--hardware-report", str(tmp_path / "no"), "x")
    assert missing.returncode == 2
    both = mig_guard(
        "check", "--config", str(config), "--hardware-report", str(broken), "--gpu-count", "2", "x"
    )
    assert both.returncode == 2 and "--gpu-count goes with --product" in both.stderr
