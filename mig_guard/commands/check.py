"""`mig-guard check`: is a named mig-parted config valid for a node's GPUs? (a CLI contract)

    mig-guard check --config FILE --product LABEL [--gpu-count N] [--json] NAME
    mig-guard check --config FILE --product LABEL [--gpu-count N] --all [--json]
    mig-guard check --config FILE --hardware-report REPORT [--json] NAME
    mig-guard check --config FILE --hardware-report REPORT --all [--json]

`--product` judges against GPU Feature Discovery's labels and the catalog; `--hardware-report`
against a node's `mig-guard.io/gpus` report (e.g. saved from `mig-guard hardware --json` or
`kubectl get node N -o jsonpath='{.metadata.annotations.mig-guard\\.io/gpus}'`), and so
against the driver's MIG table where it has one. What the config file parses to but looks
wrong is printed to stderr as warnings.

Exit codes: 0 valid (or, with --all, the file parsed), 1 invalid, 2 usage error, unknown
product, or a config file or report that cannot be read or parsed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from migcore.catalog import UnknownProductError, load_catalog
from migcore.check import CheckResult, NodeHardware, check_config, hardware_from_labels, hardware_from_report
from migcore.config import ConfigError, MigPartedConfig, load_config_file
from migcore.hardware import MAX_ANNOTATION_BYTES, HardwareReportError, NodeGpus

EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "check",
        help="check a mig-parted config name against a GPU product",
        description="Check a named mig-parted config against a GPU product (nvidia.com/gpu.product).",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="mig-parted v1 config file")
    hardware = parser.add_mutually_exclusive_group(required=True)
    hardware.add_argument("--product", metavar="LABEL", help="GPU product (nvidia.com/gpu.product value)")
    hardware.add_argument(
        "--hardware-report",
        metavar="FILE",
        help="a node's mig-guard.io/gpus report (JSON, e.g. from mig-guard hardware --json)",
    )
    parser.add_argument(
        "--gpu-count",
        type=_count,
        metavar="N",
        help="GPUs on the node (nvidia.com/gpu.count; with --product)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--all", action="store_true", help="check every config in the file")
    parser.add_argument("name", nargs="?", metavar="NAME", help="config name (nvidia.com/mig.config value)")
    parser.set_defaults(func=run, parser=parser)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a GPU count") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a GPU count (negative)")
    return value


def run(args: argparse.Namespace) -> int:
    if args.all == (args.name is not None):
        args.parser.error("give a config NAME or --all (not both)")
    if args.hardware_report and args.gpu_count is not None:
        args.parser.error("--gpu-count goes with --product (a hardware report has the GPUs)")
    catalog = load_catalog()
    try:
        if args.hardware_report:
            hardware = hardware_from_report(catalog, _read_report(args.hardware_report))
        else:
            hardware = hardware_from_labels(catalog, args.product, args.gpu_count)
    except (UnknownProductError, HardwareReportError, OSError) as exc:
        print(f"mig-guard check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config_file(args.config, catalog)
    except ConfigError as exc:
        print(f"mig-guard check: {args.config} cannot be used:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_USAGE
    for line in config.warnings:
        print(f"mig-guard check: warning: {line}", file=sys.stderr)
    if args.all:
        return _run_all(config, hardware, args.json)
    result = check_config(config, args.name, hardware)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_one(result, hardware)
    return EXIT_VALID if result.valid else EXIT_INVALID


def _read_report(path: str) -> NodeGpus:
    """A hardware report from a file; a HardwareReportError (or OSError) names what is wrong."""
    with Path(path).open("rb") as handle:
        data = handle.read(MAX_ANNOTATION_BYTES + 1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HardwareReportError(f"{path}: not UTF-8 text") from exc
    try:
        return NodeGpus.from_annotation(text.strip())
    except HardwareReportError as exc:
        raise HardwareReportError(f"{path}: {exc}") from exc


def _print_one(result: CheckResult, hardware: NodeHardware) -> None:
    if result.valid:
        print(f'config "{result.name}" is valid for {hardware.describe()}')
        print(f"  {result.summary()}")
    else:
        print(f'config "{result.name}" is INVALID for {hardware.describe()}')
        for line in result.errors:
            print(f"  error: {line}")
    for line in result.warnings:
        print(f"  warning: {line}")


def _run_all(config: MigPartedConfig, hardware: NodeHardware, as_json: bool) -> int:
    results = [check_config(config, name, hardware) for name in config.names()]
    if as_json:
        print(json.dumps([r.to_json() for r in results], indent=2))
        return EXIT_VALID
    width = max(len(r.name) for r in results)
    print(f"{'CONFIG':<{width}}  VERDICT  DETAIL")
    for r in results:
        detail = r.summary()
        if r.valid and r.warnings:
            detail += f" ({len(r.warnings)} warning{'s' if len(r.warnings) > 1 else ''})"
        print(f"{r.name:<{width}}  {'valid' if r.valid else 'INVALID':<7}  {detail}")
    valid = sum(r.valid for r in results)
    print(f"\n{valid} of {len(results)} configs are valid for {hardware.describe()}")
    return EXIT_VALID
