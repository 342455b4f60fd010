"""A webhook replica that gets SIGTERM drains (webhook.worker): the real server over TLS, with
keep-alive clients that use their connections the way the API server's HTTP client does.

Under failurePolicy Fail every admission call that is reset is a refused label write, so the
promise checked here is strict: while the server stops, a request sent on an open connection is
answered (with `Connection: close` once the stop has begun), a kept-alive connection is closed
only between requests and cleanly (TLS close_notify, then FIN: never a reset), and a client that
connects after the stop began is either served or refused outright, never accepted and dropped.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from webhook_harness import TestAuthority, WebhookProcess, client_context, gfd_labels, node, relabel, review

from migcore import keys

# Hang guards only (a test that would otherwise wait forever fails instead); nothing is timed.
HANG_GUARD_SECONDS = 30


def request_bytes(uid: str) -> bytes:
    old = node(labels=gfd_labels())
    body = json.dumps(review(relabel(old, {keys.LABEL_MIG_CONFIG: "all-1g.5gb"}), old, uid=uid)).encode()
    head = (
        "POST /validate HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def read_response(sock: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (status, lower-cased headers, body); ConnectionError when the server
    closed the connection before the whole response came."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionAbortedError(f"closed after {len(data)} bytes of a response")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionAbortedError(f"closed after {len(body)} of {length} body bytes")
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: ssl.SSLSocket) -> bool:
    """Whether the server has closed this idle connection (what Go's transport notices before it
    reuses a pooled connection). A reset here raises: it is not a clean close."""
    sock.setblocking(False)
    try:
        data = sock.recv(1)
    except ssl.SSLWantReadError:
        return False
    finally:
        sock.settimeout(HANG_GUARD_SECONDS)
    if data:
        raise AssertionError(f"unexpected bytes on an idle connection: {data!r}")
    return True


class Tally:
    """What the clients saw, from all threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answered = 0
        self.answered_after_stop = 0
        self.closed_between_requests = 0
        self.refused = 0
        self.reset_at_close = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def add(self, field: str) -> None:
        with self.lock:
            setattr(self, field, getattr(self, field) + 1)

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)


def keep_alive_client(server: WebhookProcess, tally: Tally, name: str, pause: float) -> None:
    """Sends requests one after another on a kept-alive connection, reconnecting when the server
    ends it, until the server refuses new connections."""
    context = client_context(server.ca_file)
    sent = 0
    while True:
        try:
            raw = socket.create_connection((server.host, server.port), timeout=HANG_GUARD_SECONDS)
        except ConnectionRefusedError:
            tally.add("refused")  # the server stopped listening: the client goes elsewhere
            return
        try:
            sock = context.wrap_socket(raw, server_hostname=server.host)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            if isinstance(exc, ConnectionResetError) and tally.stopping.is_set():
                # Reached the listening socket in the instant between the workers' last accept and
                # its close: the kernel resets what it queued then (no server can avoid that; the
                # chart's preStop sleep keeps the API server from connecting at that time). Like a
                # refusal, the client goes elsewhere.
                tally.add("reset_at_close")
            else:
                tally.fail(f"{name}: TLS handshake of a new connection failed: {exc!r}")
            return
        try:
            while True:
                time.sleep(pause)
                if closed_by_server(sock):
                    tally.add("closed_between_requests")
                    break
                stopping = tally.stopping.is_set()
                sent += 1
                sock.sendall(request_bytes(f"{name}-{sent}"))
                status, headers, body = read_response(sock)
                if status != 200 or json.loads(body)["response"]["allowed"] is not True:
                    tally.fail(f"{name}: {status} {body[:200]!r}")
                    return
                tally.add("answered_after_stop" if stopping else "answered")
                if headers.get("connection", "").lower() == "close":
                    break
        except (OSError, ssl.SSLError, AssertionError) as exc:
            tally.fail(f"{name}: request {sent}: {exc!r}")
            return
        finally:
            sock.close()


def stop_under_load(
    server: WebhookProcess, clients: list[Callable[[], None]], tally: Tally
) -> tuple[float, int]:
    """Start the clients, SIGTERM the server while they send, wait for both; (seconds from SIGTERM
    to exit, exit status)."""
    threads = [threading.Thread(target=client, daemon=True) for client in clients]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    while tally.answered < 4 * len(clients):
        assert time.monotonic() < deadline, f"the clients got no answers: {tally.failures}"
        time.sleep(0.05)
    assert server.process is not None
    tally.stopping.set()
    stopped = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    status = server.process.wait(HANG_GUARD_SECONDS)
    exited = time.monotonic() - stopped
    for thread in threads:
        thread.join(HANG_GUARD_SECONDS)
        assert not thread.is_alive(), "a client hung"
    return exited, status


@pytest.fixture
def server(tmp_path: Path, authority: TestAuthority, default_config_file: Path) -> Iterator[WebhookProcess]:
    with WebhookProcess(tmp_path, authority, "--mig-config-file", str(default_config_file)) as process:
        yield process


def test_sigterm_answers_every_request_and_closes_kept_alive_connections_cleanly(
    server: WebhookProcess,
) -> None:
    tally = Tally()
    clients: list[Callable[[], None]] = [
        (lambda i=i: keep_alive_client(server, tally, f"c{i}", pause=0.01 * (i % 3))) for i in range(6)
    ]
    _, status = stop_under_load(server, clients, tally)
    assert tally.failures == [], server.logs()
    assert status == 0, server.logs()
    assert tally.answered_after_stop > 0  # requests kept coming during the stop, and were answered
    # In the end each client found the port closed (refused, or reset as it closed: see above).
    assert tally.refused + tally.reset_at_close == len(clients)


@pytest.fixture
def one_worker(
    tmp_path: Path, authority: TestAuthority, default_config_file: Path
) -> Iterator[WebhookProcess]:
    with WebhookProcess(
        tmp_path, authority, "--mig-config-file", str(default_config_file), workers=1
    ) as process:
        yield process


def test_a_client_slow_to_close_does_not_stall_the_others_during_the_stop(
    one_worker: WebhookProcess,
) -> None:
    """A peer that keeps its socket open after a `Connection: close` answer (the server waits for
    its FIN) must not stop the worker from reading the other kept-alive connections."""
    server = one_worker  # one worker: both connections are hers
    context = client_context(server.ca_file)

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection((server.host, server.port), timeout=HANG_GUARD_SECONDS)
        return context.wrap_socket(raw, server_hostname=server.host)

    assert server.process is not None
    slow, other = connect(), connect()
    try:
        for sock in (slow, other):
            sock.sendall(request_bytes("warm-up"))
            assert read_response(sock)[1].get("connection", "").lower() != "close"
        server.process.send_signal(signal.SIGTERM)
        for attempt in range(1000):  # until the worker has seen the signal: `Connection: close`
            slow.sendall(request_bytes(f"slow-{attempt}"))
            status, headers, _ = read_response(slow)
            assert status == 200
            if headers.get("connection", "").lower() == "close":
                break
            time.sleep(0.01)
        # `slow` stays open. The other connection's next request is still answered.
        try:
            other.sendall(request_bytes("other"))
            status, headers, _ = read_response(other)
        except OSError as exc:
            pytest.fail(f"the request on the other kept-alive connection was dropped: {exc!r}")
        assert (status, headers.get("connection")) == (200, "close")
        assert server.process.wait(HANG_GUARD_SECONDS) == 0
    finally:
        slow.close()
        other.close()


def test_an_idle_kept_alive_connection_is_closed_cleanly_after_the_stop(one_worker: WebhookProcess) -> None:
    """No request comes: the server ends the connection with TLS close_notify and FIN, which the
    client reads as a clean end of stream (not a reset, not a truncated TLS record)."""
    context = client_context(one_worker.ca_file)
    context.check_hostname = True
    raw = socket.create_connection((one_worker.host, one_worker.port), timeout=HANG_GUARD_SECONDS)
    # suppress_ragged_eofs=False: a FIN without close_notify raises SSLEOFError here.
    sock = context.wrap_socket(raw, server_hostname=one_worker.host, suppress_ragged_eofs=False)
    try:
        sock.sendall(request_bytes("before"))
        read_response(sock)
        assert one_worker.process is not None
        one_worker.process.send_signal(signal.SIGTERM)
        try:
            assert sock.recv(1) == b""
        except ssl.SSLEOFError as exc:
            pytest.fail(f"closed without TLS close_notify: {exc!r}")
        except ConnectionResetError as exc:
            pytest.fail(f"reset: {exc!r}")
        sock.close()  # the server waits for our side to close before it exits
        assert one_worker.process.wait(HANG_GUARD_SECONDS) == 0
    finally:
        sock.close()


def test_connections_after_the_stop_are_refused_not_reset(one_worker: WebhookProcess) -> None:
    """A connection that reaches the replica after the stop began (kube-proxy has not caught up
    yet) is refused at once, which a client can tell from a call that was lost. The old worker
    left its socket listening while it drained: the kernel accepted such a connection and reset it
    when the worker exited."""
    context = client_context(one_worker.ca_file)
    raw = socket.create_connection((one_worker.host, one_worker.port), timeout=HANG_GUARD_SECONDS)
    held = context.wrap_socket(raw, server_hostname=one_worker.host)  # keeps the drain going a while
    try:
        held.sendall(request_bytes("held"))
        read_response(held)
        assert one_worker.process is not None
        one_worker.process.send_signal(signal.SIGTERM)
        served = 0
        while True:  # new connections, one after another, until the port is closed
            try:
                late = socket.create_connection(
                    (one_worker.host, one_worker.port), timeout=HANG_GUARD_SECONDS
                )
            except ConnectionRefusedError:
                break
            try:
                tls = context.wrap_socket(late, server_hostname=one_worker.host)
                tls.sendall(request_bytes(f"late-{served}"))
                assert read_response(tls)[0] == 200  # accepted before the stop, or from the backlog
                tls.close()
            except OSError as exc:
                pytest.fail(f"connection {served + 1} after SIGTERM was accepted, then lost: {exc!r}")
            served += 1
        held.close()
        assert one_worker.process.wait(HANG_GUARD_SECONDS) == 0
    finally:
        held.close()
