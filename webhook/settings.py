"""The webhook's settings: what `mig-guard webhook` parsed, passed to gunicorn and the app."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kube.config_source import ConfigMapRef
from migcore import keys
from migcore.hold import HoldMode
from webhook.configmap_guard import GuardMode

# Two objects of up to etcd's 1.5 MiB each (object and oldObject) plus the envelope: a legitimate
# review of a large Node must never be refused (failurePolicy Fail would block the write).
MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class WebhookSettings:
    host: str
    port: int
    cert_file: Path
    key_file: Path
    mig_config_file: Path | None = None
    configmap: ConfigMapRef = field(
        default_factory=lambda: ConfigMapRef(keys.GPU_OPERATOR_NAMESPACE, keys.DEFAULT_MIG_PARTED_CONFIGMAP)
    )
    reconciler_users: tuple[str, ...] = ()
    # Accept reconciler writes with tokens that name no node (clusters older than Kubernetes 1.30).
    allow_unbound_reconciler_tokens: bool = False
    # The layout a reconciler may give a MIG-capable node that has none ("": none may).
    default_mig_config: str = ""
    kubeconfig: Path | None = None
    hold: HoldMode = HoldMode.TAINT
    # Hold the node in the admin's own write (off with a rollout budget: the reconciler holds it
    # when its rollout slot is free).
    admission_hold: bool = True
    configmap_guard: GuardMode = GuardMode.DENY
    workers: int = 2
    # Request threads per worker: a stalled client holds one for up to read_timeout; with a single
    # thread two of them stalled admission (bench/bench_webhook.py, run with slow and idle clients).
    threads: int = 4
    # Longest wait for a client's next bytes (TLS handshake, headers, body): a stalled client
    # frees its request thread after this.
    read_timeout: float = 5.0
    # /healthz, /readyz and /metrics on their own port (same host), apart from admission.
    health_port: int | None = None
    # Longer than the API server's idle timeout for webhook connections (90 s), so the server
    # never closes a connection the API server is about to reuse.
    keepalive: int = 120
    timeout: int = 30
    max_body_bytes: int = MAX_BODY_BYTES
    log_level: str = "info"
    # Benchmark floor: answer every admission request "allowed" without looking at it.
    floor: bool = False
