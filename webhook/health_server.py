"""`/healthz`, `/readyz` and `/metrics` on a port of their own, answered apart from admission.

On the admission port the kubelet's probes queue behind admission requests for the same request
threads, so clients that stall that port would fail the probes too (and a liveness failure
restarts a pod that is merely under attack). Here every connection gets a thread of its own,
does its TLS handshake there (the accepting thread never waits for a client) and every read is
bounded. Each gunicorn worker runs one, all bound to the same port with SO_REUSEPORT: the
kernel spreads connections over the workers, and a dead worker takes only its own listener
with it. The answers are the same as on the admission port (`webhook.app.readiness`).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("mig_guard.webhook.health")

READ_TIMEOUT = 5.0
Answer = tuple[int, str, bytes]  # status, content type, body


class HealthServer(ThreadingHTTPServer):
    """Serves `routes` (path -> function returning an Answer) over TLS from `context()`."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        host: str,
        port: int,
        context: Callable[[], ssl.SSLContext],
        routes: dict[str, Callable[[], Answer]],
    ) -> None:
        self.context = context
        self.routes = routes
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # One listener per worker on the same port (same user only: the kernel enforces it).
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("health connection from %s failed", client_address, exc_info=True)

    def start(self) -> HealthServer:
        threading.Thread(target=self.serve_forever, name="health-server", daemon=True).start()
        return self


class _Handler(BaseHTTPRequestHandler):
    server: HealthServer
    timeout = READ_TIMEOUT  # every socket operation of this connection
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        # In this connection's own thread: a stalled handshake holds only it, for READ_TIMEOUT.
        self.request.settimeout(READ_TIMEOUT)
        self.request = self.server.context().wrap_socket(self.request, server_side=True)
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ssl.SSLError) as exc:  # a client that went away or timed out
            log.debug("health connection closed: %s", exc)

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path.split("?", 1)[0])
        status, content_type, body = route() if route else (404, "text/plain", b"not found\n")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds: not worth a log line each


def start_health_server(
    host: str, port: int, context: Callable[[], ssl.SSLContext], routes: dict[str, Callable[[], Answer]]
) -> HealthServer:
    server = HealthServer(host, port, context, routes).start()
    log.info("health endpoints listening", extra={"fields": {"address": f"{host}:{port}"}})
    return server
