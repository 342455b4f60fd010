"""Fuzzing /validate and /mutate through the Flask test client: no 5xx, no crash, every answer
well-formed. (A smaller run against the real gunicorn server is in test_server.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from answers import check_well_formed
from flask.testing import FlaskClient
from fuzz_bodies import bodies, plausible_reviews, sent_review
from hypothesis import HealthCheck, given, settings
from test_app import make_settings

from webhook.app import create_app


@pytest.fixture(scope="module")
def client(default_config_file: Path) -> FlaskClient:
    return create_app(make_settings(default_config_file)).test_client()


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=bodies(), path=...)
def test_any_body_gets_a_well_formed_answer(client: FlaskClient, body: bytes, path: bool) -> None:
    response = client.post("/validate" if path else "/mutate", data=body, content_type="application/json")
    check_well_formed(response.status_code, response.get_json(), sent_review(body))


@FUZZ
@given(doc=plausible_reviews(), path=...)
def test_hostile_reviews_get_a_well_formed_answer(client: FlaskClient, doc: object, path: bool) -> None:
    response = client.post("/validate" if path else "/mutate", json=doc)
    check_well_formed(response.status_code, response.get_json(), doc)
