"""Every label, annotation, taint and condition name that mig-guard reads or writes, and the GPU
Operator's names it defaults to.

Kept in one place so the webhook, the reconciler, the chart and the docs agree on the
wire names; nothing else in the code base spells these strings.
"""

from typing import Final

# Written by the admin or a GitOps tool: the desired layout (a mig-parted config name).
LABEL_MIG_CONFIG: Final = "nvidia.com/mig.config"
# Written by the reconciler only (the webhook sets "pending" on an accepted change).
LABEL_MIG_STATE: Final = "nvidia.com/mig.config.state"

# Written by GPU Feature Discovery; read to know the hardware.
LABEL_GPU_PRODUCT: Final = "nvidia.com/gpu.product"
LABEL_GPU_COUNT: Final = "nvidia.com/gpu.count"
LABEL_MIG_CAPABLE: Final = "nvidia.com/mig.capable"
# The device plugin's MIG strategy (single, mixed, none), from the GPU Operator's mig.strategy.
LABEL_MIG_STRATEGY: Final = "nvidia.com/mig.strategy"

# GPU Operator operand switches, paused during a change like mig-manager does.
LABEL_GPU_DEPLOY_PREFIX: Final = "nvidia.com/gpu.deploy."
PAUSED_FOR_MIG_CHANGE: Final = "paused-for-mig-change"

# The GPU Operator's namespace (its operands, its mig-parted ConfigMap) and that ConfigMap's key.
GPU_OPERATOR_NAMESPACE: Final = "gpu-operator"
# The layout the GPU Operator gives an unlabelled MIG-capable node (mig-guard: only when asked).
DEFAULT_MIG_CONFIG: Final = "all-disabled"
DEFAULT_MIG_PARTED_CONFIGMAP: Final = "default-mig-parted-config"
MIG_PARTED_CONFIG_KEY: Final = "config.yaml"

# mig-guard's own keys. Every label or annotation under this prefix is protected:
# only the reconciler's identities may change it (the webhook's own mutation excepted).
PREFIX: Final = "mig-guard.io/"
# The node's GPUs as the reconciler discovered them (format: migcore.hardware).
ANNOTATION_GPUS: Final = PREFIX + "gpus"
# Which pods use which GPU and MIG device (format: migcore.usage), for previews of a change.
ANNOTATION_USAGE: Final = PREFIX + "usage"
# A sentence saying why the state is what it is ("applied all-1g.5gb to 8 GPUs in 3.1s").
ANNOTATION_REASON: Final = PREFIX + "reason"
# What mig-guard did to hold the node (taint and/or cordon), so that only that is undone.
ANNOTATION_HOLD: Final = PREFIX + "hold"
# The plan being applied and how far it got (crash safety).
ANNOTATION_PROGRESS: Final = PREFIX + "progress"

# The taint that keeps new pods off GPUs that are about to be repartitioned.
TAINT_KEY: Final = PREFIX + "reconfiguring"
TAINT_EFFECT: Final = "NoSchedule"

# Node condition shown by `kubectl describe node`.
CONDITION_READY: Final = "MIGConfigReady"

# The rollout budget (reconciler.rollout): coordination.k8s.io Leases in the release namespace,
# labelled with their role (a slot, a failed change, the pause switch) and the pool they count in.
LABEL_ROLLOUT: Final = PREFIX + "rollout"
LABEL_POOL: Final = PREFIX + "pool"
ROLLOUT_SLOT: Final = "slot"
ROLLOUT_FAILED: Final = "failed"
ROLLOUT_PAUSE: Final = "pause"
PAUSE_LEASE: Final = "mig-guard-rollout-pause"
# What a failed change's Lease says: the layout and why it failed.
ANNOTATION_ROLLOUT_CONFIG: Final = PREFIX + "config"

STATE_PENDING: Final = "pending"
STATE_REBOOTING: Final = "rebooting"
STATE_SUCCESS: Final = "success"
STATE_FAILED: Final = "failed"
STATES: Final = (STATE_PENDING, STATE_REBOOTING, STATE_SUCCESS, STATE_FAILED)


def is_protected_key(key: str) -> bool:
    """True for keys that only the reconciler may change (so success cannot be spoofed)."""
    return key == LABEL_MIG_STATE or key.startswith(PREFIX)
