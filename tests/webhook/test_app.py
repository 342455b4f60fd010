"""The Flask app through its test client: endpoints, answers, limits, readiness, metrics."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from answers import check_well_formed
from flask import Flask
from flask.testing import FlaskClient
from webhook_harness import gfd_labels, node, relabel, review

from migcore import keys
from webhook.app import create_app
from webhook.settings import MAX_BODY_BYTES, WebhookSettings


def make_settings(config_file: Path | None, **extra: Any) -> WebhookSettings:
    return WebhookSettings(
        host="127.0.0.1",
        port=0,
        cert_file=Path("unused.crt"),
        key_file=Path("unused.key"),
        mig_config_file=config_file,
        **extra,
    )


@pytest.fixture
def app(default_config_file: Path) -> Flask:
    return create_app(make_settings(default_config_file))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def post(client: FlaskClient, path: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(path, data=data, content_type="application/json")
    return response.status_code, response.get_json()


def labelled_change(config: str) -> dict:
    old = node(labels=gfd_labels())
    return review(relabel(old, {keys.LABEL_MIG_CONFIG: config}), old, uid="abc-123")


def test_validate_answers_an_admission_review(client: FlaskClient) -> None:
    sent = labelled_change("all-1g.5gbb")
    status, body = post(client, "/validate", sent)
    check_well_formed(status, body, sent)
    assert body["response"]["uid"] == "abc-123"
    assert body["response"]["allowed"] is False
    assert "did you mean all-1g.5gb" in body["response"]["status"]["message"]


def test_mutate_answers_with_a_json_patch(client: FlaskClient) -> None:
    sent = labelled_change("all-1g.5gb")
    status, body = post(client, "/mutate", sent)
    check_well_formed(status, body, sent)
    ops = json.loads(base64.b64decode(body["response"]["patch"]))
    assert {"op": "add", "path": "/metadata/labels/nvidia.com~1mig.config.state", "value": "pending"} in ops


def test_mutate_does_not_patch_what_validation_denies(client: FlaskClient) -> None:
    status, body = post(client, "/mutate", labelled_change("all-3g.40gb"))
    assert status == 200
    assert body["response"]["allowed"] is True
    assert "patch" not in body["response"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty body"),
        (b"{", "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}', "admission.k8s.io/v1"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "request is missing"),
        (b"[" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_bodies_get_400_with_a_reason(client: FlaskClient, body: bytes, fragment: str) -> None:
    status, answer = post(client, "/validate", body)
    assert status == 400
    assert fragment in answer["error"]


def test_node_with_a_non_string_label_is_a_400(client: FlaskClient) -> None:
    sent = labelled_change("all-1g.5gb")
    sent["request"]["object"]["metadata"]["labels"]["x"] = 5
    status, answer = post(client, "/validate", sent)
    assert status == 400
    assert "labels" in answer["error"]


def test_a_large_node_is_still_judged(client: FlaskClient) -> None:
    sent = labelled_change("all-1g.5gbb")
    sent["request"]["object"]["metadata"]["annotations"] = {"big": "x" * (1024 * 1024)}
    sent["request"]["oldObject"]["metadata"]["annotations"] = {"big": "x" * (1024 * 1024)}
    status, body = post(client, "/validate", sent)
    assert (status, body["response"]["allowed"]) == (200, False)


def test_oversized_body_is_413(client: FlaskClient) -> None:
    sent = labelled_change("all-1g.5gb")
    sent["request"]["object"]["metadata"]["annotations"] = {"big": "x" * MAX_BODY_BYTES}
    status, answer = post(client, "/validate", sent)
    assert status == 413
    assert "larger than" in answer["error"]


def test_other_kinds_are_allowed_untouched(client: FlaskClient) -> None:
    sent = review({"metadata": {"name": "p"}}, None, operation="CREATE", kind="Pod", namespace="default")
    for path in ("/validate", "/mutate"):
        status, body = post(client, path, sent)
        assert (status, body["response"]["allowed"], "patch" in body["response"]) == (200, True, False)


def test_wrong_method_and_unknown_path(client: FlaskClient) -> None:
    assert client.get("/validate").status_code == 405
    assert client.get("/nope").get_json()["code"] == 404


def test_health_and_readiness(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert "configs from file" in ready.get_data(as_text=True)


def test_not_ready_until_a_config_loads(tmp_path: Path) -> None:
    broken = tmp_path / "config.yaml"
    broken.write_text("version: v1\nmig-configs: [oops\n")
    client = create_app(make_settings(broken)).test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert "does not parse" in ready.get_data(as_text=True)
    status, body = post(client, "/validate", labelled_change("all-1g.5gb"))
    assert status == 503
    assert "no mig-parted config loaded" in body["error"]


def test_metrics_count_requests_by_verdict(client: FlaskClient) -> None:
    post(client, "/validate", labelled_change("all-1g.5gbb"))
    post(client, "/validate", labelled_change("all-1g.5gb"))
    post(client, "/validate", b"{")
    post(client, "/validate", review(node(labels={"team": "ml"}), node(), uid="other"))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'mig_guard_webhook_requests_total{endpoint="validate",verdict="denied"} 1.0' in text
    # Accepted, with a warning: the node has no hardware report, so no impact can be shown.
    assert 'mig_guard_webhook_requests_total{endpoint="validate",verdict="warned"} 1.0' in text
    assert 'mig_guard_webhook_requests_total{endpoint="validate",verdict="allowed"} 1.0' in text
    assert 'mig_guard_webhook_requests_total{endpoint="validate",verdict="malformed"} 1.0' in text
    assert "mig_guard_webhook_config_age_seconds " in text
    assert 'mig_guard_webhook_config_reloads_total{result="success"} 1.0' in text


def test_floor_mode_allows_without_looking(default_config_file: Path) -> None:
    client = create_app(make_settings(default_config_file, floor=True)).test_client()
    sent = labelled_change("all-1g.5gbb")
    status, body = post(client, "/validate", sent)
    assert (status, body["response"]) == (200, {"uid": "abc-123", "allowed": True})
