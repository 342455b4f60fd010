"""`kubectl mig plan NODE CONFIG`: what labelling NODE with CONFIG would do, writing nothing: the
GPUs that change (with their NVML operations), what is destroyed and created on each, the pods it
evicts and the GPUs it leaves alone. The same planner and pod matching as the reconciler
(`migcore.impact`), on what the node's reconciler reports (its GPUs and the pods on them)."""

from __future__ import annotations

from typing import Any

from mig_guard.plugin.cluster import Cluster, PluginError, gpu_report, usage_report
from migcore import keys
from migcore.catalog import Catalog
from migcore.check import (
    check_config,
    hardware_from_report,
    quoted_name,
    unknown_config_message,
    valid_config_names,
    valid_names_text,
)
from migcore.impact import current_layouts, impact_of, plan_for
from migcore.usage import SOURCE_POD_SPEC
from migcore.wording import gpus_text


def collect(
    cluster: Cluster, catalog: Catalog, node_name: str, name: str, configmap: str | None
) -> dict[str, Any]:
    node = cluster.node(node_name)
    report = gpu_report(node)
    mig = cluster.mig_config(catalog, configmap)
    hardware = hardware_from_report(catalog, report)
    where = f"node {node.name} ({hardware.describe()}, from {keys.ANNOTATION_GPUS})"
    if name not in mig.config.configs:
        raise PluginError(
            unknown_config_message(mig.config, name, origin=mig.origin, hardware=hardware, where=where)
        )
    result = check_config(mig.config, name, hardware)
    if not result.valid:
        message = f"{quoted_name(name)} does not fit {where}: {'; '.join(result.errors)}."
        raise PluginError(
            message + valid_names_text(valid_config_names(mig.config, hardware), " Valid for it")
        )
    usage = usage_report(node)
    impact = impact_of(name, plan_for(result, current_layouts(report)), usage)
    return {
        "node": node.name,
        "from": node.mig_config or None,
        "to": name,
        "configSource": mig.origin,
        **impact.to_json(),
        "headline": impact.headline(),
        "groups": _groups(impact.to_json()["gpus"]),
        "warnings": list(result.warnings),
        "apply": f"kubectl label node {node.name} {keys.LABEL_MIG_CONFIG}={name} --overwrite",
    }


def _groups(gpus: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Changed GPUs that change alike (the same operations) and evict nothing, together; a GPU
    that evicts pods on its own."""
    out: list[dict[str, Any]] = []
    for gpu in gpus:
        alone = bool(gpu["evicts"] or gpu["notNamed"])
        same = next(
            (
                g
                for g in out
                if not alone
                and not g["evicts"]
                and not g["notNamed"]
                and g["operations"] == gpu["operations"]
            ),
            None,
        )
        if same is not None:
            same["gpus"].append(gpu["index"])
            continue
        out.append(
            {
                "gpus": [gpu["index"]],
                "change": gpu["change"],
                "layout": gpu["layout"],
                "reset": gpu["reset"],
                "evicts": gpu["evicts"],
                "notNamed": gpu["notNamed"],
                "operations": gpu["operations"],
            }
        )
    return out


def render(data: dict[str, Any], operations: bool = False) -> str:
    out = [f"node {data['node']}: {data['from'] or '(no layout)'} -> {data['to']} ({data['configSource']})"]
    out.append(data["headline"])
    known = data["usage"] is not None
    for group in data["groups"]:
        line = f"{gpus_text(group['gpus'])}: {group['change']}"
        if known:
            pods = group["evicts"] + ([f"{group['notNamed']} not named"] if group["notNamed"] else [])
            line += f", evicts {', '.join(pods) or 'no pods'}"
        out.append(line)
        each = "each: " if len(group["gpus"]) > 1 else ""
        if operations:
            out += [f"    {each}{op}" for op in group["operations"]]
        else:
            count = len(group["operations"])
            reset = ", with a GPU reset" if group["reset"] else ""
            out.append(f"    {each}{group['layout']} ({count} NVML operations{reset})")
    if data["untouched"]:
        out.append(f"{gpus_text(data['untouched'])} untouched")
    for text in data["warnings"]:
        out.append(f"warning: {text}")
    usage = data["usage"]
    if usage is None:
        out.append(f"pods: unknown (no {keys.ANNOTATION_USAGE} on the node yet)")
    else:
        source = (
            "no PodResources on the node: every GPU pod counts"
            if usage["source"] == SOURCE_POD_SPEC
            else "from the kubelet's PodResources"
        )
        out.append(f"pods: {source}, as reported since {usage['since'] or '(unknown)'}")
        more = f" and {data['notNamed']} not named in the report" if data["notNamed"] else ""
        out.append(
            f"evicts ({len(data['evicts']) + data['notNamed']}): {', '.join(data['evicts']) or 'none'}{more}"
        )
    if data["groups"]:
        out.append(f"nothing was changed; to apply: {data['apply']}")
    return "\n".join(out)
