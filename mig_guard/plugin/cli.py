"""`kubectl mig`: the command line (console script `kubectl-mig`, so kubectl finds it on PATH).

    kubectl mig status [NODE...]        the fleet at a glance
    kubectl mig plan NODE CONFIG        what labelling NODE with CONFIG would do (writes nothing)
    kubectl mig configs NODE            the configs that fit NODE, and why the others do not
    kubectl mig why NODE                reason, condition, Events, hold, what the reconciler waits for

Every command takes `-o json`, `--kubeconfig` and `--context` (default: the current kubeconfig and
context, as kubectl's). Exit codes: 0 done, 1 an error (one sentence on stderr: an unknown node,
no report yet, forbidden, ...; for `plan`, a config that does not fit), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mig_guard.plugin import configs, plan, status, why
from mig_guard.plugin.cluster import Cluster, PluginError
from migcore.catalog import load_catalog

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")


def _common(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """The flags every command takes, before the command or after it (`kubectl mig -o json status`
    as `kubectl mig status -o json`): the defaults are set once, on the top parser."""

    def default(value: str | None) -> str | None:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "-o", "--output", choices=("text", "json"), default=default("text"), help="output format"
    )
    parser.add_argument(
        "--kubeconfig",
        metavar="FILE",
        default=default(None),
        help="default: $KUBECONFIG, else ~/.kube/config",
    )
    parser.add_argument(
        "--context", metavar="NAME", default=default(None), help="default: the kubeconfig's current context"
    )


def _configmap(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configmap",
        metavar="NAMESPACE/NAME",
        help="the mig-parted ConfigMap (default: $KUBECTL_MIG_CONFIGMAP, else the one mig-guard's chart "
        "made, else gpu-operator/default-mig-parted-config)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kubectl mig",
        description="See MIG layouts, and what a change would do, before changing anything (read only).",
    )
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("status", help="each GPU node: GPUs, layout, state, for how long, why, held or not")
    p.add_argument("nodes", nargs="*", metavar="NODE", help="default: every GPU node")
    _common(p)
    p = sub.add_parser("plan", help="what labelling NODE with CONFIG would do, and the pods it would evict")
    p.add_argument("node", metavar="NODE")
    p.add_argument("config", metavar="CONFIG", help="a config name (the nvidia.com/mig.config value)")
    p.add_argument("--operations", action="store_true", help="list every NVML operation, in order")
    _configmap(p)
    _common(p)
    p = sub.add_parser("configs", help="the configs that fit NODE, and why each other one does not")
    p.add_argument("node", metavar="NODE")
    _configmap(p)
    _common(p)
    p = sub.add_parser("why", help="why NODE is in its state, and what mig-guard is waiting for")
    p.add_argument("node", metavar="NODE")
    _common(p)
    return parser


def _commands(
    args: argparse.Namespace,
) -> tuple[Callable[[Cluster], dict[str, Any]], Callable[[dict[str, Any]], str]]:
    if args.command == "status":
        return (lambda c: status.collect(c, list(args.nodes))), status.render
    if args.command == "plan":
        return (
            lambda c: plan.collect(c, load_catalog(), args.node, args.config, args.configmap),
            lambda data: plan.render(data, args.operations),
        )
    if args.command == "configs":
        return (lambda c: configs.collect(c, load_catalog(), args.node, args.configmap)), configs.render
    return (lambda c: why.collect(c, args.node)), why.render


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    collect, render = _commands(args)
    try:
        data = collect(Cluster(args.kubeconfig, args.context))
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.output == "json":
        print(json.dumps(data, indent=2))
    else:
        print(render(data))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
