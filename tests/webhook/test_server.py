"""The real `mig-guard webhook` command: gunicorn, TLS, several workers.

Certificate rotation without a restart or a failed request, metrics aggregated over workers,
HTTP limits, and a smaller fuzz run against the real server.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from answers import check_well_formed
from fuzz_bodies import bodies, sent_review
from hypothesis import HealthCheck, given, settings
from webhook_harness import (
    MIG_GUARD,
    TestAuthority,
    WebhookProcess,
    gfd_labels,
    node,
    relabel,
    review,
    served_serial,
)

from migcore import keys


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, authority: TestAuthority, default_config_file: Path
) -> Iterator[WebhookProcess]:
    with WebhookProcess(
        tmp_path_factory.mktemp("webhook"), authority, "--mig-config-file", str(default_config_file)
    ) as process:
        yield process


def change_review(config: str, uid: str = "u") -> dict:
    old = node(labels=gfd_labels())
    return review(relabel(old, {keys.LABEL_MIG_CONFIG: config}), old, uid=uid)


def test_rotated_certificate_is_served_without_restart_or_failed_request(server: WebhookProcess) -> None:
    assert served_serial(server.host, server.port, server.ca_file) == server.serial
    pid = server.process.pid  # type: ignore[union-attr]
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def load(new_connections: bool) -> None:
        conn = server.connection()
        while not stop.is_set():
            try:
                if new_connections:
                    conn.close()
                    conn = server.connection()
                body = json.dumps(change_review("all-1g.5gb", uid=str(answered[0]))).encode()
                conn.request("POST", "/validate", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = json.loads(response.read())
                if response.status != 200 or payload["response"]["allowed"] is not True:
                    failures.append(f"{response.status} {payload}")
                answered[0] += 1
            except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                failures.append(repr(exc))
                conn.close()
                conn = server.connection()
        conn.close()

    threads = [threading.Thread(target=load, args=(fresh,), daemon=True) for fresh in (False, True)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        new_serial = server.authority.issue(server.cert_file, server.key_file)

        def every_worker_serves_it() -> bool:
            # Each worker notices on its next connection (up to tls.STAT_INTERVAL later); ten
            # handshakes in a row spread over both workers.
            return all(
                served_serial(server.host, server.port, server.ca_file) == new_serial for _ in range(10)
            )

        deadline = time.monotonic() + 15
        while not every_worker_serves_it():
            assert time.monotonic() < deadline, "new certificate not served by every worker within 15s"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert failures == []
    assert answered[0] > 10
    assert server.process.pid == pid and server.process.poll() is None  # type: ignore[union-attr]
    server.serial = new_serial


def test_metrics_add_up_over_all_workers(server: WebhookProcess) -> None:
    before = server.metric("mig_guard_webhook_requests_total", endpoint="mutate")
    sent = 30
    for i in range(sent):  # a fresh connection each: gunicorn spreads them over its workers
        status, _ = server.post("/mutate", change_review("all-2g.10gb", uid=f"m{i}"))
        assert status == 200
    assert server.metric("mig_guard_webhook_requests_total", endpoint="mutate") - before == sent
    assert server.metric("mig_guard_webhook_request_duration_seconds_count", endpoint="mutate") >= sent


def test_http_limits_on_the_real_server(server: WebhookProcess) -> None:
    # The declared size alone is refused: 413 comes back before any of the body is sent (sending
    # a body the server will not read races with the server closing the connection).
    conn = server.connection()
    try:
        conn.putrequest("POST", "/validate")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(8 * 1024 * 1024))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413
        assert "larger than" in json.loads(response.read())["error"]
    finally:
        conn.close()
    status, body = server.post("/validate", b"not json")
    assert status == 400
    assert "not valid JSON" in body["error"]


def test_denial_over_the_wire(server: WebhookProcess) -> None:
    status, body = server.post("/validate", change_review("all-1g.5gbb", uid="typo"))
    check_well_formed(status, body, change_review("all-1g.5gbb", uid="typo"))
    assert body["response"]["status"]["code"] == 400
    log = server.logs()
    assert '"uid":"typo"' in log
    assert '"verdict":"denied"' in log


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies(), validate=...)
def test_fuzz_the_real_server(server: WebhookProcess, body: bytes, validate: bool) -> None:
    status, answer = server.post("/validate" if validate else "/mutate", body)
    check_well_formed(status, answer, sent_review(body))


def test_unusable_config_file_is_a_usage_error(tmp_path: Path, authority: TestAuthority) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    authority.issue(cert, key)
    bad = tmp_path / "config.yaml"
    bad.write_text("version: v2\n")
    argv = [
        MIG_GUARD,
        "webhook",
        "--listen",
        "127.0.0.1:1",
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
    ]
    result = subprocess.run(
        [*argv, "--mig-config-file", str(bad)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "version" in result.stderr
    result = subprocess.run(
        [*argv[:-1], str(tmp_path / "absent.key")], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "no such file" in result.stderr


def test_a_worker_that_exits_leaves_the_metrics_directory_to_the_others(
    tmp_path: Path, authority: TestAuthority, default_config_file: Path
) -> None:
    """A worker that ends (restarted after a timeout, or the first one done draining) runs up
    through `serve()` in its own process: it must not remove the metrics directory that the
    other workers, and its replacement, still write to (each request would fail with a 500)."""
    with WebhookProcess(tmp_path, authority, "--mig-config-file", str(default_config_file)) as server:
        assert server.process is not None
        master = server.process.pid

        def workers() -> set[str]:
            found = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True, check=False)
            return set(found.stdout.split())

        def wait_for_two(but_not: str = "") -> set[str]:
            deadline = time.monotonic() + 30
            while len(found := workers() - {but_not}) != 2:
                assert time.monotonic() < deadline, f"workers: {workers()}"
                time.sleep(0.1)
            return found

        first = sorted(wait_for_two())[0]
        os.kill(int(first), signal.SIGTERM)  # it drains and exits; the arbiter starts a replacement
        wait_for_two(but_not=first)
        while first in workers():
            time.sleep(0.1)
        for i in range(30):  # a fresh connection each: both workers answer some
            status, body = server.post("/validate", change_review("all-1g.5gb", uid=f"after-{i}"))
            assert status == 200, body
        assert server.metric("mig_guard_webhook_requests_total", endpoint="validate") >= 30
