"""Certificate files followed on disk: a new pair is served, a half-written one is not."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

from cryptography import x509
from webhook_harness import TestAuthority, client_context

from webhook.tls import CertificateFiles


def handshake_serial(files: CertificateFiles, ca_file: Path) -> int:
    """Serve one TLS handshake with the current context on a loopback socket pair."""
    server_sock, client_sock = socket.socketpair()
    context = files.context()
    done: list[BaseException] = []

    def serve() -> None:
        try:
            with context.wrap_socket(server_sock, server_side=True):
                pass
        except (OSError, ssl.SSLError) as exc:
            done.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    with client_context(ca_file).wrap_socket(client_sock, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    thread.join(5)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_rotated_files_are_served_without_a_restart(tmp_path: Path, authority: TestAuthority) -> None:
    cert, key, ca = tmp_path / "tls.crt", tmp_path / "tls.key", authority.write_ca(tmp_path / "ca.crt")
    first = authority.issue(cert, key)
    files = CertificateFiles(cert, key, stat_interval=0)
    assert handshake_serial(files, ca) == first
    second = authority.issue(cert, key)
    assert handshake_serial(files, ca) == second
    assert files.reloads == 1


def test_a_mismatched_pair_mid_rotation_keeps_the_old_one(tmp_path: Path, authority: TestAuthority) -> None:
    cert, key, ca = tmp_path / "tls.crt", tmp_path / "tls.key", authority.write_ca(tmp_path / "ca.crt")
    first = authority.issue(cert, key)
    files = CertificateFiles(cert, key, stat_interval=0)
    authority.issue(tmp_path / "next.crt", tmp_path / "next.key")
    (tmp_path / "next.crt").replace(cert)  # the certificate arrived, its key not yet
    assert handshake_serial(files, ca) == first
    (tmp_path / "next.key").replace(key)
    assert handshake_serial(files, ca) != first
