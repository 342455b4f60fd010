"""`kubectl mig configs NODE`: every config of the mig-parted config, judged for NODE the way the
webhook judges a label (its GPUs from the node's report, else from GPU Feature Discovery's
labels): what each valid one gives the GPUs, and why each invalid one does not fit."""

from __future__ import annotations

import re
from typing import Any

from mig_guard.plugin.cluster import Cluster, PluginError
from mig_guard.plugin.text import table
from migcore.catalog import Catalog
from migcore.check import check_config
from migcore.wording import shorten
from webhook.node_hardware import HardwareResolver

DETAIL_SHOWN = 110


def collect(cluster: Cluster, catalog: Catalog, node_name: str, configmap: str | None) -> dict[str, Any]:
    node = cluster.node(node_name)
    finding = HardwareResolver(catalog).find(node)
    if finding.hardware is None:
        raise PluginError(f"cannot judge configs for node {node.name}: {'; '.join(finding.warnings)}")
    mig = cluster.mig_config(catalog, configmap)
    configs = []
    for name in mig.config.names():
        result = check_config(mig.config, name, finding.hardware)
        configs.append(
            {
                "name": name,
                "valid": result.valid,
                "current": name == node.mig_config,
                "detail": result.summary()
                if result.valid
                else "; ".join(_short(e, name) for e in result.errors),
                "warnings": list(result.warnings),
            }
        )
    return {
        "node": node.name,
        "gpus": finding.source,
        "configSource": mig.origin,
        "notes": list(finding.warnings),
        "configs": configs,
    }


def _short(error: str, name: str) -> str:
    """An error without what the table already says: `config "NAME" on <GPUs> (GPUs 0-7): why`
    becomes `GPUs 0-7: why`, `config "NAME" has no entry ...` becomes `has no entry ...`."""
    found = re.match(r'config "[^"]*" on .*? \(((?:GPU|GPUs|every GPU)[^)]*)\): (.*)$', error)
    if found:
        return f"{found.group(1)}: {found.group(2)}"
    return error.removeprefix(f'config "{name}" ')


def render(data: dict[str, Any]) -> str:
    ordered = sorted(data["configs"], key=lambda c: not c["valid"])  # those that fit first
    rows = [
        [
            ("* " if c["current"] else "  ") + c["name"],
            "yes" if c["valid"] else "no",
            shorten(c["detail"], DETAIL_SHOWN),
        ]
        for c in ordered
    ]
    valid = sum(c["valid"] for c in data["configs"])
    lines = [table(["  CONFIG", "FITS", "WHAT IT GIVES, OR WHY IT DOES NOT FIT"], rows), ""]
    lines.append(
        f"{valid} of {len(data['configs'])} configs in {data['configSource']} fit node {data['node']} "
        f"({data['gpus']}); * marks its current layout"
    )
    lines += [f"note: {n}" for n in data["notes"]]
    return "\n".join(lines)
