"""A tiny HTTPS admission webhook server for tests (stdlib http.server + ssl, in a thread).

    with AdmissionTestServer(lambda review: deny("no")) as server:
        register_webhook(api, "validating", "t", server.url("/validate"), server.ca_pem, rules)

``decide`` gets the AdmissionReview ``request`` dict and returns the ``response`` fields
(``allowed``, ``status``, ``patch``...); ``uid`` is filled in. Every request is recorded in ``calls``.
Listens on 127.0.0.1 only, with a serving certificate from its own CA (``ca_pem``).
"""

from __future__ import annotations

import json
import ssl
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from devcluster.pki import CertificateAuthority

Decision = Callable[[dict[str, Any]], dict[str, Any]]


def allow() -> dict[str, Any]:
    return {"allowed": True}


def deny(message: str, code: int = 403) -> dict[str, Any]:
    return {"allowed": False, "status": {"code": code, "message": message}}


class AdmissionTestServer:
    def __init__(self, decide: Decision, host: str = "127.0.0.1") -> None:
        self.decide = decide
        self.host = host
        self.calls: list[dict[str, Any]] = []
        self._ca = CertificateAuthority.create("admission-test-ca")
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def ca_pem(self) -> bytes:
        return self._ca.cert_pem

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.server_address[1])

    def url(self, path: str = "/") -> str:
        return f"https://{self.host}:{self.port}/{path.lstrip('/')}"

    def start(self) -> AdmissionTestServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                review = json.loads(self.rfile.read(length))
                request = review.get("request", {})
                outer.calls.append({"path": self.path, "request": request})
                try:
                    response = dict(outer.decide(request))
                except Exception as exc:  # a broken test decision is reported, not hung
                    response = deny(f"test webhook error: {exc!r}", 500)
                response["uid"] = request.get("uid", "")
                body = json.dumps(
                    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        pair = self._ca.issue_server("admission-test", [self.host, "localhost"])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as tmp:
            crt, key = pair.write(Path(tmp), "tls")
            ctx.load_cert_chain(str(crt), str(key))
        server = ThreadingHTTPServer((self.host, 0), Handler)
        server.daemon_threads = True
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="admission-test-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> AdmissionTestServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
