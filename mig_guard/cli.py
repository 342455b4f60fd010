"""`mig-guard` command line. Each subcommand lives in its own module under
`mig_guard.commands` and registers itself; this module only dispatches.

Exit codes (a contract other tools rely on): 0 success/valid, 1 invalid, 2 usage error or
unreadable input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mig_guard.commands import (
    certs,
    check,
    demo,
    hardware,
    plan,
    profiles,
    reconcile,
    rollout,
    uninstall,
    webhook,
)

COMMANDS = (check, profiles, hardware, webhook, reconcile, plan, certs, rollout, uninstall, demo)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mig-guard", description="Safe NVIDIA MIG layout changes on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
