"""The Flask app: one Blueprint per endpoint family (admission, health, metrics).

`create_app` runs in each gunicorn worker (the app is not preloaded), so the config source's
watch thread and the Kubernetes client are created after the fork, one per worker: each
worker has its own parsed cache and never makes an API call per admission request.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from kubernetes import client as k8s
from werkzeug.exceptions import ClientDisconnected, HTTPException

from kube.client import api_client
from kube.config_source import ConfigMapFeed, ConfigSource, FileFeed
from migcore.catalog import load_catalog
from webhook.admission_handler import AdmissionHandler
from webhook.configmap_guard import ApiNodeLister, ConfigMapGuard
from webhook.impact import ImpactPreview
from webhook.metrics import WebhookMetrics
from webhook.node_hardware import HardwareResolver
from webhook.review import ReviewError, decode_json, parse_review
from webhook.settings import WebhookSettings
from webhook.validation import NodeRules

log = logging.getLogger("mig_guard.webhook.admission")

JSON = "application/json"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class WebhookState:
    """What the endpoints share inside one worker."""

    def __init__(
        self,
        settings: WebhookSettings,
        metrics: WebhookMetrics,
        source: ConfigSource | None,
        handler: AdmissionHandler | None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.source = source
        self.handler = handler


def _state() -> WebhookState:
    state: WebhookState = current_app.extensions["mig_guard"]
    return state


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status, mimetype=JSON)


def _error(status: int, message: str) -> Response:
    return _json({"error": message, "code": status}, status)


admission = Blueprint("admission", __name__)


def _body() -> bytes | Response:
    """The request body, or a 408 when the client stopped sending it (the worker's read timeout)."""
    try:
        return request.get_data(cache=False)
    except ClientDisconnected:
        return _error(408, f"request body not received within {_state().settings.read_timeout:g} s")


def _answer(endpoint: str) -> Response:
    state = _state()
    started = time.perf_counter()
    body = _body()
    if isinstance(body, Response):
        state.metrics.requests.labels(endpoint, "malformed").inc()
        return body
    try:
        review = parse_review(body)
    except ReviewError as exc:
        state.metrics.requests.labels(endpoint, "malformed").inc()
        log.info("malformed admission review", extra={"fields": {"endpoint": endpoint, "error": str(exc)}})
        return _error(400, f"malformed AdmissionReview: {exc}")
    view = state.source.state.view if state.source else None
    if view is None or state.handler is None:
        state.metrics.requests.labels(endpoint, "unready").inc()
        return _error(503, "no mig-parted config loaded yet: see /readyz")
    decide = state.handler.validate if endpoint == "validate" else state.handler.mutate
    try:
        verdict, name = decide(review, view)
    except ReviewError as exc:
        state.metrics.requests.labels(endpoint, "malformed").inc()
        return _error(400, f"malformed AdmissionReview: {exc}")
    answer = verdict.to_review(review.uid)
    elapsed = time.perf_counter() - started
    state.metrics.requests.labels(endpoint, verdict.label).inc()
    state.metrics.latency.labels(endpoint).observe(elapsed)
    fields: dict[str, Any] = {
        "endpoint": endpoint,
        "uid": review.uid,
        "kind": review.kind,
        "name": name,
        "operation": review.operation,
        "user": review.username,
        "dryRun": review.dry_run,
        "verdict": verdict.label,
        "ms": round(elapsed * 1000, 2),
    }
    if not verdict.allowed:
        fields["code"] = verdict.code
        fields["message"] = answer["response"].get("status", {}).get("message", "")
    log.info("admission", extra={"fields": fields})
    return _json(answer)


@admission.post("/validate")
def validate() -> Response:
    return _answer("validate")


@admission.post("/mutate")
def mutate() -> Response:
    return _answer("mutate")


floor = Blueprint("floor", __name__)


def _allow_all() -> Response:
    """The benchmark floor: same server, same JSON decode, no judgement."""
    data = _body()
    if isinstance(data, Response):
        return data
    try:
        body = decode_json(data)
        uid = body["request"]["uid"]
    except (ReviewError, KeyError, TypeError) as exc:
        return _error(400, f"malformed AdmissionReview: {exc}")
    return _json(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {"uid": uid, "allowed": True},
        }
    )


floor.add_url_rule("/validate", "validate", _allow_all, methods=["POST"])
floor.add_url_rule("/mutate", "mutate", _allow_all, methods=["POST"])


health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz() -> Response:
    """The process answers: nothing more is checked (a restart would not fix a missing config)."""
    return Response("ok\n", mimetype="text/plain")


def readiness(state: WebhookState) -> tuple[int, str]:
    """Ready once a mig-parted config is loaded (status code and text; also on the health port)."""
    if state.settings.floor:
        return 200, "ready (floor mode)\n"
    source_state = state.source.state if state.source else None
    if source_state is None or source_state.view is None:
        reason = source_state.problem if source_state else "no config source"
        return 503, f"not ready: {reason}\n"
    text = f"ready: {len(source_state.view.config.configs)} configs from {source_state.view.origin}\n"
    if source_state.last_good_in_use:
        text += f"warning: last good version in use: {source_state.problem}\n"
    return 200, text


def health_routes(state: WebhookState) -> dict[str, Callable[[], tuple[int, str, bytes]]]:
    """The health port's answers: the same as the admission port's /healthz, /readyz and /metrics."""

    def ready() -> tuple[int, str, bytes]:
        status, text = readiness(state)
        return status, "text/plain", text.encode()

    return {
        "/healthz": lambda: (200, "text/plain", b"ok\n"),
        "/readyz": ready,
        "/metrics": lambda: (200, PROMETHEUS_TEXT, state.metrics.exposition()),
    }


@health.get("/readyz")
def readyz() -> Response:
    status, text = readiness(_state())
    return Response(text, status=status, mimetype="text/plain")


metrics_bp = Blueprint("metrics", __name__)


@metrics_bp.get("/metrics")
def metrics() -> Response:
    return Response(_state().metrics.exposition(), mimetype=PROMETHEUS_TEXT)


def _http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    if code == 413:
        return _error(413, f"request body larger than {_state().settings.max_body_bytes} bytes")
    return _error(code, exc.description or exc.name)


def build_state(settings: WebhookSettings, metrics: WebhookMetrics) -> WebhookState:
    """Config source, rules, guard and handler for these settings (starts the source's thread)."""
    if settings.floor:
        return WebhookState(settings, metrics, None, None)
    catalog = load_catalog()
    hardware = HardwareResolver(catalog)
    guard = None
    if settings.mig_config_file is not None:
        source = ConfigSource(FileFeed(settings.mig_config_file), catalog, metrics)
        source.refresh()  # ready before the first request
    else:
        api = api_client(settings.kubeconfig)  # in this worker: connection pools do not survive a fork
        source = ConfigSource(ConfigMapFeed(api, settings.configmap), catalog, metrics)
        nodes = ApiNodeLister(k8s.CoreV1Api(api))
        guard = ConfigMapGuard(settings.configmap, nodes, hardware, settings.configmap_guard)
    metrics.track_config_age(lambda: source.state.loaded_at)
    source.start()
    rules = NodeRules(
        hardware,
        settings.reconciler_users,
        allow_unbound=settings.allow_unbound_reconciler_tokens,
        default_config=settings.default_mig_config,
    )
    hold = settings.hold if settings.admission_hold else None
    handler = AdmissionHandler(rules, hold, guard, impact=ImpactPreview(hardware))
    return WebhookState(settings, metrics, source, handler)


def create_app(settings: WebhookSettings, state: WebhookState | None = None) -> Flask:
    """The WSGI app for one worker (or for a test client, with a prepared `state`)."""
    app = Flask("mig_guard.webhook")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["mig_guard"] = state or build_state(settings, WebhookMetrics())
    app.register_blueprint(floor if settings.floor else admission)
    app.register_blueprint(health)
    app.register_blueprint(metrics_bp)
    app.register_error_handler(HTTPException, _http_error)
    return app
