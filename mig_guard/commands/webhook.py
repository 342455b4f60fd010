"""`mig-guard webhook`: not implemented yet (placeholder so the CLI wiring is fixed)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("webhook", help="(not implemented yet)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("mig-guard webhook: not implemented yet", file=sys.stderr)
    return 2
