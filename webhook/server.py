"""gunicorn running the webhook app with the project's settings.

gthread workers with bounded waits for slow and idle clients (`webhook.worker`; keep-alive
connections from the API server are parked in the worker's poller instead of pinning a thread),
TLS through the `ssl_context` hook so certificate rotation needs no restart, no preload (each
worker builds its app, watch thread and Kubernetes client after the fork), Prometheus
multiprocess files in a fresh directory, and (with a health port) `/healthz`, `/readyz` and
`/metrics` served apart from admission in every worker (`webhook.health_server`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication

from webhook import jsonlog
from webhook.app import create_app, health_routes
from webhook.health_server import start_health_server
from webhook.metrics import MULTIPROC_ENV, mark_worker_dead
from webhook.settings import WebhookSettings
from webhook.tls import CertificateFiles

GIL_SWITCH_INTERVAL = 0.0005
# After SIGTERM a worker drains for at most this long (webhook.worker), then gunicorn kills it. The
# chart's terminationGracePeriodSeconds is its preStop sleep plus this plus a margin.
GRACEFUL_TIMEOUT_SECONDS = 10


def gunicorn_options(settings: WebhookSettings, certificates: CertificateFiles) -> dict[str, Any]:
    """The gunicorn configuration (also what the benchmark tunes)."""

    def ssl_context(_config: Any, _default_factory: Callable[[], Any]) -> Any:
        return certificates.context()

    def child_exit(_server: Any, worker: Any) -> None:
        mark_worker_dead(worker.pid)

    def post_fork(_server: Any, worker: Any) -> None:
        worker.read_timeout = settings.read_timeout
        jsonlog.configure(settings.log_level)
        # A request arriving on a kept-alive connection is picked up by the worker's poller thread,
        # which waits for the GIL while another thread runs a request: with Python's default 5 ms
        # switch interval that wait dominates latency at moderate load (measured in bench_webhook).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)

    def post_worker_init(worker: Any) -> None:
        if settings.health_port is not None:
            routes = health_routes(worker.wsgi.extensions["mig_guard"])
            start_health_server(settings.host, settings.health_port, certificates.context, routes)

    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": settings.workers,
        "worker_class": "webhook.worker.BoundedThreadWorker",
        "threads": settings.threads,
        "keepalive": settings.keepalive,
        "timeout": settings.timeout,
        "graceful_timeout": GRACEFUL_TIMEOUT_SECONDS,
        "certfile": str(settings.cert_file),
        "keyfile": str(settings.key_file),
        "ssl_context": ssl_context,
        "do_handshake_on_connect": True,
        "limit_request_line": 8190,
        "limit_request_fields": 100,
        "limit_request_field_size": 8190,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning" if settings.log_level.lower() != "debug" else "debug",
        "preload_app": False,
        "child_exit": child_exit,
        "post_fork": post_fork,
        "post_worker_init": post_worker_init,
        "proc_name": "mig-guard-webhook",
    }


class WebhookServer(BaseApplication):  # type: ignore[misc]
    """A gunicorn application whose config comes from WebhookSettings, not from the command line."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.certificates = CertificateFiles(settings.cert_file, settings.key_file)
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_options(self.settings, self.certificates).items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self.settings)


def serve(settings: WebhookSettings) -> int:
    """Run gunicorn until it is stopped (SIGTERM/SIGINT); returns its exit status."""
    jsonlog.configure(settings.log_level)
    metrics_dir = tempfile.mkdtemp(prefix="mig-guard-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    master = os.getpid()
    try:
        WebhookServer(settings).run()
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int | None) else 1
    finally:
        # A worker is forked inside run() and ends by raising SystemExit up through here too: only
        # the master, last to go, removes what every worker (and a replacement) writes to.
        if os.getpid() == master:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
