"""gunicorn's threaded worker, with bounded waits for slow and idle clients.

In gthread a request thread is given each new connection and waits there, up to 5 s, for its
first bytes; then it does the TLS handshake and reads the request with no timeout at all. So a
connection that sends nothing costs a thread 5 s, and one that sends half a handshake or half a
body keeps its thread for as long as it stays open: two such clients stall two single-threaded
workers, and with them every admission request (failurePolicy Fail: every MIG label write).

This worker waits `first_data_wait` (the API server sends its TLS hello at once; a connection that
sends nothing goes back to the poller, which costs no thread), and bounds every socket read and
write of the handshake and the request by `read_timeout`. The settings arrive in `post_fork`.
"""

from __future__ import annotations

import errno
from typing import Any

from gunicorn.workers import gthread

DEFAULT_READ_TIMEOUT = 5.0
DEFAULT_FIRST_DATA_WAIT = 0.05


class _BoundedSocket:
    """A connection's socket (plain, then TLS) as gthread handles it: "blocking" means blocking for at
    most `timeout` (gthread puts sockets in blocking mode, with no timeout, before the TLS handshake
    and before each request), and a read that times out is a client that went away (gunicorn logs
    a reset at debug level, not a server error with a traceback)."""

    def __init__(self, sock: Any, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout

    def setblocking(self, flag: bool) -> None:
        self._sock.settimeout(self._timeout if flag else 0.0)

    def recv(self, size: int) -> bytes:
        try:
            data: bytes = self._sock.recv(size)
        except TimeoutError as exc:
            raise ConnectionResetError(
                errno.ECONNRESET, f"client sent nothing for {self._timeout:g} s"
            ) from exc
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class BoundedConn(gthread.TConn):  # type: ignore[misc]
    """A connection whose waits are bounded (see the module docstring)."""

    def __init__(
        self, cfg: Any, sock: Any, client: Any, server: Any, *, read_timeout: float, first_data_wait: float
    ) -> None:
        self.read_timeout = read_timeout
        self.first_data_wait = first_data_wait
        super().__init__(cfg, _BoundedSocket(sock, read_timeout), client, server)

    def __setattr__(self, name: str, value: Any) -> None:
        # gthread replaces `sock` with the TLS socket after the handshake: bound that one too.
        if name == "sock" and not isinstance(value, _BoundedSocket):
            value = _BoundedSocket(value, self.read_timeout)
        super().__setattr__(name, value)

    def wait_for_data(self, timeout: float) -> bool:
        return bool(super().wait_for_data(min(timeout, self.first_data_wait)))

    def init(self) -> None:
        try:
            super().init()
        except TimeoutError as exc:  # the TLS handshake stalled: gunicorn closes quietly on this
            raise StopIteration("TLS handshake timed out") from exc


class BoundedThreadWorker(gthread.ThreadWorker):  # type: ignore[misc]
    read_timeout = DEFAULT_READ_TIMEOUT
    first_data_wait = DEFAULT_FIRST_DATA_WAIT

    def accept(self, listener: Any) -> None:
        """gthread's accept, with a BoundedConn."""
        try:
            client_sock, client_addr = listener.accept()
            self.nr_conns += 1
            client_sock.setblocking(True)
            conn = BoundedConn(
                self.cfg,
                client_sock,
                client_addr,
                listener.getsockname(),
                read_timeout=self.read_timeout,
                first_data_wait=self.first_data_wait,
            )
            self.enqueue_req(conn)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
