"""`mig-guard plan`: show what mig-guard would do to go from one config to another.

It builds fresh simulated GPUs, applies config `--from` to them through the same NVML code the
reconciler runs, then prints the plan to reach `--to`: per GPU, the NVML operations in order.
No GPU or cluster is needed, so an admin can see before labelling a node how much a change
disturbs (which GPUs, how many instances, whether a GPU reset is needed).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from migcore.catalog import Catalog, load_catalog
from migcore.check import check_config, hardware_from_report
from migcore.config import ConfigError, MigPartedConfig, load_config_file
from migcore.planning import NodePlan, desired_geometries, plan_node
from reconciler.gpu_access import GpuAccess, GpuError
from reconciler.gpu_apply import apply_with_rollback
from reconciler.gpu_backend import make_gpu_access


class _Refused(Exception):
    """A config that cannot be applied to these GPUs (exit 1); the message says why."""


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "plan",
        help="print the NVML operations that change simulated GPUs from one MIG config to another",
        description=__doc__,
    )
    parser.add_argument(
        "--config", required=True, metavar="FILE", help="mig-parted config file (version: v1)"
    )
    parser.add_argument(
        "--simulated-gpus",
        required=True,
        metavar="LABEL:N[,LABEL:N]",
        help="the GPUs, by nvidia.com/gpu.product label and count, e.g. NVIDIA-A100-SXM4-40GB:8",
    )
    parser.add_argument("--from", dest="source", required=True, metavar="NAME", help="config applied first")
    parser.add_argument("--to", dest="target", required=True, metavar="NAME", help="config to plan for")
    parser.add_argument(
        "--json", action="store_true", help='print {"gpus": [{"index": i, "operations": [...]}]}'
    )
    parser.set_defaults(func=run)


def _desired(
    config: MigPartedConfig, name: str, access: GpuAccess, catalog: Catalog
) -> tuple[dict[int, Any], dict[int, Any]]:
    """(current, desired) layouts for config `name`, judged against what the GPUs report."""
    result = check_config(config, name, hardware_from_report(catalog, access.discover()))
    if not result.valid:
        raise _Refused(f'config "{name}" cannot be applied: ' + "; ".join(result.errors))
    current = access.geometries()
    return current, desired_geometries(result, current)


def _print_text(plan: NodePlan, source: str, target: str) -> None:
    print(f"{source} -> {target}: {plan.summary()}")
    for gpu in plan.changed:
        print(gpu.describe())
        for op in gpu.operations:
            print(f"  {op.describe(with_gpu=False)}")


def run(args: argparse.Namespace) -> int:
    try:
        catalog = load_catalog()
        config = load_config_file(args.config, catalog)
    except (ConfigError, OSError) as exc:
        print(f"mig-guard plan: {exc}", file=sys.stderr)
        return 2
    try:
        access = make_gpu_access("simulated", args.simulated_gpus)
    except (ValueError, LookupError) as exc:
        print(f"mig-guard plan: --simulated-gpus: {exc}", file=sys.stderr)
        return 2
    access.start()
    try:
        current, desired = _desired(config, args.source, access, catalog)
        for gpu_plan in plan_node(current, desired).changed:
            outcome = apply_with_rollback(access, gpu_plan)
            if not outcome.ok:
                raise _Refused(f'applying "{args.source}" failed: {outcome.reason}')
        current, desired = _desired(config, args.target, access, catalog)
        plan = plan_node(current, desired)
    except (_Refused, GpuError, ValueError) as exc:
        print(f"mig-guard plan: {exc}", file=sys.stderr)
        return 1
    finally:
        access.stop()
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        _print_text(plan, args.source, args.target)
    return 0
