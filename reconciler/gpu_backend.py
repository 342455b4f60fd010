"""Builds the GpuAccess the reconciler runs on: real NVML on a node, the simulated one elsewhere.

The `mig-guard reconcile` flags `--gpu-backend`, `--simulated-gpus`, `--simulated-state-file`,
`--simulated-faults` and `--simulated-latency` map one to one onto `make_gpu_access`'s arguments.
"""

from __future__ import annotations

from reconciler.gpu_access import GpuAccess
from reconciler.nvml_sim import SimulatedNvml, SimulationSpecError, parse_gpus_spec

BACKENDS = ("nvml", "simulated")


def make_gpu_access(
    backend: str,
    simulated_gpus: str | None = None,
    state_file: str | None = None,
    faults: str | None = None,
    latency: str | None = None,
) -> GpuAccess:
    """`nvml`: the real pynvml module. `simulated`: GPUs from `LABEL:N[,LABEL:N]` (or, when
    `state_file` exists, the GPUs saved there, so a restarted reconciler finds them as they were).
    Raises SimulationSpecError (a ValueError) on a bad spec, with the bad part in the message."""
    if backend == "nvml":
        if simulated_gpus or state_file or faults or latency:
            raise SimulationSpecError("--simulated-* options need --gpu-backend simulated")
        import pynvml  # noqa: PLC0415 - only a real node needs the NVML library loaded

        return GpuAccess(pynvml)
    if backend != "simulated":
        raise SimulationSpecError(f'unknown GPU backend "{backend}" (known: {", ".join(BACKENDS)})')
    labels = parse_gpus_spec(simulated_gpus) if simulated_gpus else None
    return GpuAccess(SimulatedNvml(labels, state_file=state_file, faults=faults, latency=latency))
