"""Slow and idle clients against the real server (gunicorn over TLS): a client that stalls mid-body,
one that stalls mid-handshake and connections that never send a byte must not hold up admission
for anyone else, nor the health probes. (How long others wait meanwhile: bench/bench_webhook.py,
the run "with slow and idle clients".)"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from webhook_harness import A100, TestAuthority, WebhookProcess, free_port, gfd_labels, node, relabel, review

from migcore import keys

# Hang guard for each request of the test: on the old server a request could wait for as long as
# a slow client held on (forever); nothing here measures speed.
HANG_GUARD_SECONDS = 60


def slow_body_client(server: WebhookProcess) -> ssl.SSLSocket:
    """Headers and one byte of a 100 kB body, then nothing."""
    raw = socket.create_connection((server.host, server.port), timeout=HANG_GUARD_SECONDS)
    tls = ssl.create_default_context(cafile=str(server.ca_file)).wrap_socket(raw, server_hostname=server.host)
    tls.sendall(
        b"POST /validate HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n{"
    )
    return tls


def half_handshake_client(server: WebhookProcess) -> socket.socket:
    """The first bytes of a TLS ClientHello, then nothing."""
    raw = socket.create_connection((server.host, server.port), timeout=HANG_GUARD_SECONDS)
    raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    return raw


def idle_client(server: WebhookProcess) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=HANG_GUARD_SECONDS)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


HEALTH_PORT = free_port()


@pytest.fixture
def server(tmp_path: Path, authority: TestAuthority, default_config_file: Path) -> Iterator[WebhookProcess]:
    process = WebhookProcess(
        tmp_path,
        authority,
        "--mig-config-file",
        str(default_config_file),
        "--health-port",
        str(HEALTH_PORT),
        "--read-timeout",
        "2",
    )
    with process:
        yield process


def test_admission_and_probes_go_on_while_slow_and_idle_clients_hold_on(server: WebhookProcess) -> None:
    stalled = [slow_body_client(server) for _ in range(2)] + [half_handshake_client(server)]
    idle = [idle_client(server) for _ in range(4)]
    try:
        old = node(labels=gfd_labels(A100))
        for i in range(20):  # fresh connections (10 s hang guard each): spread over both workers
            body = review(relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gbb"}), old, uid=f"u{i}")
            status, answer = server.post("/validate", body)
            assert status == 200
            assert answer["response"]["allowed"] is False
        # The probes on their own port are answered too.
        assert server.get("/healthz", HEALTH_PORT) == (200, "ok\n")
        status, text = server.get("/readyz", HEALTH_PORT)
        assert status == 200 and text.startswith("ready")
        # The stalled clients are cut off by the server: the slow body with a 408.
        for sock in stalled:
            sock.settimeout(HANG_GUARD_SECONDS)
        answers = [read_until_closed(sock) for sock in stalled]
        assert answers[0].startswith(b"HTTP/1.1 408") and b"request body not received" in answers[0]
        assert answers[2] == b""
        assert "Traceback" not in server.logs()
    finally:
        for sock in stalled + idle:
            sock.close()


def handshaken_client(server: WebhookProcess) -> ssl.SSLSocket:
    """A TLS connection with the handshake done and no request (yet): what the API server's HTTP
    client keeps as a spare when it dials more connections in a burst than it then needs."""
    raw = socket.create_connection((server.host, server.port), timeout=HANG_GUARD_SECONDS)
    return ssl.create_default_context(cafile=str(server.ca_file)).wrap_socket(
        raw, server_hostname=server.host
    )


def test_spare_tls_connections_hold_no_request_thread(
    tmp_path: Path, authority: TestAuthority, default_config_file: Path
) -> None:
    """Found by bench/bench_fleet.py: in a burst of Node writes the API server dials connections it
    then keeps idle; each held a request thread (read from until --read-timeout), all 8 of them
    were taken, and admission stopped until the API server's own 5 s timeout failed the writes.
    Here the read timeout is longer than the client's wait for an answer: before the fix no
    request was answered while the spares were open."""
    process = WebhookProcess(
        tmp_path, authority, "--mig-config-file", str(default_config_file), "--read-timeout", "30"
    )
    with process:
        spares = [handshaken_client(process) for _ in range(12)]  # more than 2 workers x 4 threads
        try:
            old = node(labels=gfd_labels(A100))
            for i in range(8):
                body = review(relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gbb"}), old, uid=f"s{i}")
                status, answer = process.post("/validate", body)
                assert status == 200
                assert answer["response"]["allowed"] is False
            # A spare is still served when its client uses it.
            spares[0].sendall(b"GET /readyz HTTP/1.1\r\nHost: webhook\r\nConnection: close\r\n\r\n")
            assert read_until_closed(spares[0]).startswith(b"HTTP/1.1 200")
            assert "Traceback" not in process.logs()
        finally:
            for sock in spares:
                sock.close()
