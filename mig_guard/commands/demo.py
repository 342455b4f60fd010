"""`mig-guard demo`: run the whole product locally (no GPU, no cluster); see mig_guard.demo."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="start a local control plane, the webhook and simulated GPU nodes, and show mig-guard at work",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="stop after the scripted part instead of staying up for kubectl (for CI)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) after stopping")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mig_guard.demo import run_demo  # noqa: PLC0415 - heavy imports only when the demo runs

    return run_demo(wait=not args.no_wait, keep=args.keep)
