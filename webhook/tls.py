"""Serving certificate and key read from files and picked up again when they change.

gunicorn asks its `ssl_context` hook for a context on every new connection. `CertificateFiles`
answers with a cached context and builds a fresh one when the files' identity (inode, size,
mtime: a Secret rotation swaps a symlink, so the inode changes) differs. Open connections keep
their session; new handshakes get the new certificate; no restart. A half-written pair (cert
and key not matching yet) keeps the previous context until both are consistent.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from pathlib import Path

log = logging.getLogger("mig_guard.webhook.tls")

# Re-stat at most this often (seconds): a stat per connection is cheap, but bounded anyway.
STAT_INTERVAL = 0.5


def _identity(path: Path) -> tuple[int, int, int]:
    stat = os.stat(path)
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def build_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2+) for this certificate chain and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    context.set_alpn_protocols(["http/1.1"])
    return context


class CertificateFiles:
    """A TLS context that follows the certificate and key files on disk."""

    def __init__(self, cert_file: Path, key_file: Path, stat_interval: float = STAT_INTERVAL) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._stat_interval = stat_interval
        self._lock = threading.Lock()
        self._identity = (_identity(cert_file), _identity(key_file))
        self._context = build_context(cert_file, key_file)  # fail at start on a bad pair
        self._checked = time.monotonic()
        self.reloads = 0

    def context(self) -> ssl.SSLContext:
        """The current context, rebuilt first if the files changed."""
        now = time.monotonic()
        if now - self._checked < self._stat_interval:
            return self._context
        with self._lock:
            self._checked = now
            try:
                identity = (_identity(self.cert_file), _identity(self.key_file))
            except OSError as exc:
                log.warning(
                    "certificate files unreadable, keeping the loaded ones",
                    extra={"fields": {"error": str(exc)}},
                )
                return self._context
            if identity == self._identity:
                return self._context
            try:
                self._context = build_context(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                # Mid-rotation (new cert, old key): keep serving the old pair, look again soon.
                log.warning(
                    "new certificate not usable yet, keeping the loaded one",
                    extra={"fields": {"error": str(exc)}},
                )
                return self._context
            self._identity = identity
            self.reloads += 1
            log.info("serving certificate reloaded", extra={"fields": {"cert": str(self.cert_file)}})
            return self._context
