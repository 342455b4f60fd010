"""A fault-injecting HTTPS proxy in front of the real kube-apiserver, for tests of failure handling.

    proxy = FaultProxy(plane).start()
    api = proxy.api_client()                      # talks to the API server through the proxy
    proxy.add(Fault(node_write("gpu-1"), status=503))   # the next write of that Node fails once

Every request that no fault matches reaches the real API server unchanged (streamed responses,
watches included), so the client sees real answers; a fault replaces exactly one exchange with
what a client meets at fleet scale: a 5xx or 429 (an overloaded server, a webhook timing out), a
409, a request that hangs until the client gives up, a dropped connection, or a callback (a
test SIGKILLing the client in the middle of its write). Clients speak TLS to the proxy (its own
CA, `ca_pem`); upstream it authenticates with a client certificate issued by the cluster CA.
"""

from __future__ import annotations

import http.client
import json
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kubernetes import client as k8s

from devcluster.pki import CertificateAuthority

LOOPBACK = "127.0.0.1"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes

    @property
    def watch(self) -> bool:
        return self.query.get("watch", ["false"])[0] in ("true", "1")


@dataclass
class Fault:
    """What to do with the next `times` requests that `match` (None: every one, until removed),
    after letting `skip` of them through.

    `status`: answer with this status and a Kubernetes Status body instead of forwarding.
    `hang`: hold the request that long, then drop the connection without an answer.
    `drop`: close the connection at once, without an answer.
    `before` / `after`: callbacks run before forwarding / after the API server answered (with its
    status) but before the client gets the answer (e.g. SIGKILL the client: its write took effect,
    it never knew).
    """

    match: Callable[[Request], bool]
    status: int | None = None
    message: str = "injected by the test fault proxy"
    hang: float | None = None
    drop: bool = False
    before: Callable[[Request], None] | None = None
    after: Callable[[Request, int], None] | None = None
    times: int | None = 1
    skip: int = 0  # let this many matching requests through first
    hits: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    status: int  # 0: no answer (hung or dropped)
    injected: bool


def node_write(name: str, *, status: bool | None = None) -> Callable[[Request], bool]:
    """A write of Node `name` (its object, or with `status=True` only its status subresource)."""
    object_path = f"/api/v1/nodes/{name}"

    def match(request: Request) -> bool:
        if request.method not in WRITES:
            return False
        if status is None:
            return request.path in (object_path, object_path + "/status")
        return request.path == (object_path + "/status" if status else object_path)

    return match


def any_request(request: Request) -> bool:
    return True


@dataclass
class FaultProxy:
    """Serve on 127.0.0.1 (an ephemeral port) until `stop`; forward to `plane`'s API server."""

    plane: Any
    user: str = "fault-proxy"
    groups: tuple[str, ...] = ("system:masters",)
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ca = CertificateAuthority.create("fault-proxy-ca")
        self._server: ThreadingHTTPServer | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="fault-proxy-")

    # --- lifecycle ---------------------------------------------------------------------------------
    @property
    def ca_pem(self) -> bytes:
        return self._ca.cert_pem

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"https://{LOOPBACK}:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        workdir = Path(self._dir.name)
        crt, key = self._ca.issue_server("fault-proxy", [LOOPBACK, "localhost"]).write(workdir, "serving")
        downstream = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        downstream.load_cert_chain(str(crt), str(key))
        ca = workdir / "apiserver-ca.crt"
        ca.write_bytes(self.plane.ca_pem)
        client_crt, client_key = self.plane.pki.ca.issue_client(self.user, self.groups).write(
            workdir, "client"
        )
        upstream = ssl.create_default_context(cafile=str(ca))
        upstream.load_cert_chain(str(client_crt), str(client_key))
        target = urlsplit(self.plane.server_url)
        (workdir / "ca.crt").write_bytes(self.ca_pem)
        handler = _handler(self, upstream, target.hostname or LOOPBACK, target.port or 443)
        server = ThreadingHTTPServer((LOOPBACK, 0), handler)
        server.daemon_threads = True
        server.socket = downstream.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._dir.cleanup()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def api_client(self) -> Any:
        """A new kubernetes ApiClient whose requests go through the proxy."""
        cfg = k8s.Configuration()
        cfg.host = self.url
        cfg.ssl_ca_cert = str(Path(self._dir.name) / "ca.crt")
        cfg.verify_ssl = True
        return k8s.ApiClient(cfg)

    # --- faults ------------------------------------------------------------------------------------
    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def count(self, match: Callable[[Request], bool], *, succeeded: bool = False) -> int:
        """How many requests the proxy saw that `match` (on method and path); with `succeeded`,
        only those the API server answered with a 2xx (not a conflict retried, not a fault)."""
        with self._lock:
            seen = list(self.seen)
        return sum(
            1
            for s in seen
            if match(Request(s.method, s.path, {}, b"")) and (not succeeded or 200 <= s.status < 300)
        )

    def _fault_for(self, request: Request) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times is not None and fault.hits >= fault.times:
                    continue
                if fault.match(request):
                    if fault.skipped < fault.skip:
                        fault.skipped += 1
                        continue
                    fault.hits += 1
                    return fault
        return None

    def _record(self, request: Request, status: int, injected: bool) -> None:
        with self._lock:
            self.seen.append(Seen(request.method, request.path, status, injected))


def _status_body(code: int, message: str) -> bytes:
    reasons = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 504: "Timeout"}
    return json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reasons.get(code, "ServiceUnavailable"),
            "code": code,
        }
    ).encode()


def _handler(
    proxy: FaultProxy, upstream: ssl.SSLContext, host: str, port: int
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms ACK waits
        _conn: http.client.HTTPSConnection | None = None

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            request = Request(self.command, parts.path, parse_qs(parts.query), body)
            fault = proxy._fault_for(request)
            if fault is not None and fault.before is not None:
                fault.before(request)
            if fault is not None and (fault.hang is not None or fault.drop):
                if fault.hang:
                    time.sleep(fault.hang)
                proxy._record(request, 0, True)
                self.close_connection = True
                return
            if fault is not None and fault.status is not None:
                payload = _status_body(fault.status, fault.message)
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                proxy._record(request, fault.status, True)
                return
            self._forward(request, fault)

        def _upstream(self) -> http.client.HTTPSConnection:
            """One upstream connection per client connection (kept alive like the client's)."""
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(host, port, context=upstream, timeout=120)
            return self._conn

        def _forward(self, request: Request, fault: Fault | None) -> None:
            conn = self._upstream()
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn.request(self.command, self.path, body=request.body or None, headers=headers)
                response = conn.getresponse()
                streamed = response.getheader("Content-Length") is None
                payload = b"" if streamed else response.read()
                if fault is not None and fault.after is not None:
                    fault.after(request, response.status)
                proxy._record(request, response.status, fault is not None)
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                if not streamed:
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while chunk := response.read1(65536):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except (OSError, http.client.HTTPException):
                self.close_connection = True
                conn.close()
                self._conn = None

        def finish(self) -> None:
            if self._conn is not None:
                self._conn.close()
            super().finish()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    return Handler
