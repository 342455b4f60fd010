"""Builds the GpuAccess the reconciler runs on: real NVML on a node, the simulated one elsewhere.

The `mig-guard reconcile` flags `--gpu-backend`, `--simulated-gpus`, `--simulated-gpu-spec`,
`--simulated-state-file`, `--simulated-faults` and `--simulated-latency` map one to one onto
`make_gpu_access`'s arguments.
"""

from __future__ import annotations

from reconciler.gpu_access import GpuAccess
from reconciler.nvml_sim import (
    GpuModel,
    SimulatedNvml,
    SimulationSpecError,
    parse_gpu_spec_files,
    parse_gpus_spec,
)

BACKENDS = ("nvml", "simulated")


def make_gpu_access(
    backend: str,
    simulated_gpus: str | None = None,
    state_file: str | None = None,
    faults: str | None = None,
    latency: str | None = None,
    *,
    simulated_gpu_spec: str | None = None,
    mig_enabled: bool = False,
) -> GpuAccess:
    """`nvml`: the real pynvml module. `simulated`: GPUs from `LABEL:N[,LABEL:N]` (catalog
    products) or `FILE:N[,FILE:N]` (driver-table files, GPUs the catalog need not know), or, when
    `state_file` exists, the GPUs saved there, so a restarted reconciler finds them as they were.
    `mig_enabled`: new simulated GPUs start with MIG on. Raises SimulationSpecError (a ValueError)
    on a bad spec, with the bad part in the message."""
    if backend == "nvml":
        if simulated_gpus or simulated_gpu_spec or state_file or faults or latency:
            raise SimulationSpecError("--simulated-* options need --gpu-backend simulated")
        import pynvml  # noqa: PLC0415 - only a real node needs the NVML library loaded

        return GpuAccess(pynvml)
    if backend != "simulated":
        raise SimulationSpecError(f'unknown GPU backend "{backend}" (known: {", ".join(BACKENDS)})')
    if simulated_gpus and simulated_gpu_spec:
        raise SimulationSpecError("give --simulated-gpus or --simulated-gpu-spec, not both")
    gpus: list[str | GpuModel] | None = None
    if simulated_gpus:
        gpus = list(parse_gpus_spec(simulated_gpus))
    elif simulated_gpu_spec:
        gpus = list(parse_gpu_spec_files(simulated_gpu_spec))
    return GpuAccess(
        SimulatedNvml(gpus, state_file=state_file, faults=faults, latency=latency, mig_enabled=mig_enabled)
    )
