"""gunicorn's threaded worker, with bounded waits for slow and idle clients and a drain on SIGTERM.

Bounded waits. In gthread a request thread is given each new connection and waits there, up to
5 s, for its first bytes; then it does the TLS handshake and reads the request with no timeout at
all. So a connection that sends nothing costs a thread 5 s, and one that sends half a handshake or
half a body keeps its thread for as long as it stays open: two such clients stall two
single-threaded workers, and with them every admission request (failurePolicy Fail: every MIG
label write). This worker waits `first_data_wait` (the API server sends its TLS hello at once; a
connection that sends nothing goes back to the poller, which costs no thread), and bounds every
socket read and write of the handshake and the request by `read_timeout`. The settings arrive in
`post_fork`.

Spare connections. After the handshake the worker waits `first_data_wait` again for the
request: in a burst the API server's HTTP client dials more connections than it then uses and
keeps the spares idle. gthread would read each spare until `read_timeout` in a request thread; a
handful of spares took every thread and admission stopped until the API server's own timeout
failed the writes (bench/bench_fleet.py, a push to 40 nodes). A spare goes back to the poller like
a kept-alive connection.

Closing. gthread closes a connection after a `Connection: close` answer by waiting, on the thread
that polls every kept-alive connection, up to 2 s for the client to close its side: meanwhile no
other client's request is read, and one that arrives on a connection whose keep-alive time ends
meanwhile is dropped unanswered (seen as "connection reset by peer" on the API server during a
rolling update). Here a connection is closed between requests without waiting on anything: TLS
close_notify, then FIN, then the poller reads and drops what the client still sends until it closes
too (a socket closed with unread bytes is answered with a reset), for `CLOSE_LINGER` at most.

Drain (SIGTERM; the chart's preStop sleep has already let the endpoint removal reach kube-proxy
and the API servers): the worker accepts what is already in the listen backlog and closes its
listening sockets, so a late connection is refused rather than accepted by the kernel and reset
when the worker exits; every request on an open connection, in flight or still arriving, is
answered, with `Connection: close`; an idle kept-alive connection gets `KEEPALIVE_LINGER` for a
request its client may be sending and is then closed cleanly; the worker exits when no connection
is left, and before gunicorn's graceful timeout in any case.
"""

from __future__ import annotations

import contextlib
import errno
import select
import selectors
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn.workers import gthread

DEFAULT_READ_TIMEOUT = 5.0
DEFAULT_FIRST_DATA_WAIT = 0.05
# After SIGTERM, how long an idle kept-alive connection stays open for a request its client may
# already be sending (gthread's own figure). The API server then finds it closed between requests.
KEEPALIVE_LINGER = 2.0
# A connection being closed: how long its client has to close its side, and how much of what it
# still sends is read and dropped meanwhile.
CLOSE_LINGER = 2.0
CLOSE_DRAIN_BYTES = 64 * 1024
# The worker's drain ends this long before gunicorn's graceful timeout (then the arbiter kills it).
EXIT_MARGIN = 1.0


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
        handshake = not self.initialized and self.cfg.is_ssl
        try:
            super().init()
        except TimeoutError as exc:  # the TLS handshake stalled: gunicorn closes quietly on this
            raise StopIteration("TLS handshake timed out") from exc
        if handshake and not self._request_arrives():
            raise SpareConnection

    def _request_arrives(self) -> bool:
        """Whether the first request's bytes are here, or arrive within `first_data_wait`."""
        if self.sock.pending():  # decrypted already, behind the handshake
            return True
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            return bool(selector.select(timeout=self.first_data_wait))


class SpareConnection(BaseException):  # not an Exception: gthread's handler must not see it
    """A TLS connection whose client sent no request after the handshake (see the module)."""


def _raw(sock: Any) -> Any:
    return sock._sock if isinstance(sock, _BoundedSocket) else sock


def _readable(sock: Any) -> bool:
    """Bytes are waiting on `sock` (in the kernel, or already decrypted by TLS), or the client closed."""
    raw = _raw(sock)
    try:
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return True
        poll = select.poll()
        poll.register(raw, select.POLLIN)
        return bool(poll.poll(0))
    except (OSError, ValueError):
        return False


@dataclass(eq=False)
class _Closing:
    """A connection whose side we have shut, waiting for the client to close its own."""

    sock: Any
    deadline: float
    drained: int = 0


class BoundedThreadWorker(gthread.ThreadWorker):  # type: ignore[misc]
    read_timeout = DEFAULT_READ_TIMEOUT
    first_data_wait = DEFAULT_FIRST_DATA_WAIT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closing: deque[_Closing] = deque()  # in deadline order (each gets now + CLOSE_LINGER)
        self.linger_until: float | None = None  # set when the drain begins

    def handle(self, conn: Any) -> Any:
        """gthread's handle; a spare connection goes back to the poller (its thread is free), and
        its first request is read when it arrives."""
        try:
            return super().handle(conn)
        except SpareConnection:
            conn.data_ready = False
            return gthread._DEFER

    def accept(self, listener: Any) -> bool:
        """gthread's accept, with a BoundedConn; False when no connection was waiting."""
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return e.errno == errno.ECONNABORTED  # that one is gone, others may be waiting
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
        return True

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """gthread's loop (accept, dispatch, expire), then the drain instead of gthread's shutdown."""
        self.poller.register(
            self.method_queue.fileno(), selectors.EVENT_READ, self.method_queue.run_callbacks
        )
        self.set_accept_enabled(True)
        while self.alive:
            self.notify()
            can_accept = self.nr_conns < self.worker_connections
            if can_accept != self._accepting:
                self.set_accept_enabled(can_accept)
            self.wait_for_and_dispatch_events(timeout=1.0)
            if not self.is_parent_alive():
                break
            self._expire_waiting()
        self.drain()
        self.tpool.shutdown(wait=False)
        self.poller.close()
        self.method_queue.close()

    def drain(self) -> None:
        """Answer what is on its way, close every connection between requests, then return."""
        self.alive = False  # from here on every answer says `Connection: close` (gthread)
        now = time.monotonic()
        self.linger_until = now + KEEPALIVE_LINGER
        deadline = now + max(self.cfg.graceful_timeout - EXIT_MARGIN, KEEPALIVE_LINGER)
        self._stop_listening()
        for conn in (*self.keepalived_conns, *self.pending_conns):
            conn.timeout = min(conn.timeout, self.linger_until)
        while self.nr_conns > 0:
            now = time.monotonic()
            if now >= deadline:
                break
            self.notify()
            self.wait_for_and_dispatch_events(timeout=self._next_expiry(deadline) - now)
            self._expire_waiting()
        # The graceful timeout is near: whatever is still open goes now.
        for conn in (*self.keepalived_conns, *self.pending_conns):
            with contextlib.suppress(OSError):
                conn.sock.close()
        for closing in self.closing:
            with contextlib.suppress(OSError):
                closing.sock.close()

    def _stop_listening(self) -> None:
        """Take what the kernel already accepted for us, then close the listening sockets (the
        arbiter has closed its own): later connections are refused, not accepted and reset."""
        self.set_accept_enabled(False)
        for listener in self.sockets:
            with contextlib.suppress(OSError):
                listener.setblocking(False)
                while self.nr_conns < self.worker_connections and self.accept(listener):
                    pass
            listener.close()

    def _next_expiry(self, deadline: float) -> float:
        """When the loop must look at the clocks again: the first wait to end, within a second."""
        first = [time.monotonic() + 1.0, deadline]
        first += [queue[0].timeout for queue in (self.keepalived_conns, self.pending_conns) if queue]
        if self.closing:
            first.append(self.closing[0].deadline)
        return max(min(first), time.monotonic())

    # --- connections between requests ---------------------------------------------------------

    def finish_request(self, conn: Any, fs: Any) -> None:
        """gthread's, except that a connection to close is closed without waiting on this (the
        poller's) thread, and one that waits for its first bytes during the drain is kept."""
        try:
            result = fs.result() if not fs.cancelled() else False
        except Exception:
            result = False
        if not result:
            self.close_between_requests(conn)
        elif result is gthread._DEFER and not self.alive:
            conn.sock.setblocking(False)
            conn.timeout = self.linger_until or time.monotonic()
            self.pending_conns.append(conn)
            self.poller.register(
                conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn)
            )
        else:
            super().finish_request(conn, fs)

    def _expire_waiting(self) -> None:
        """End the waits that are over (kept-alive and new connections, and closes)."""
        now = time.monotonic()
        for queue in (self.keepalived_conns, self.pending_conns):
            while queue and queue[0].timeout <= now:
                conn = queue.popleft()
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self.poller.unregister(conn.sock)
                if _readable(conn.sock):
                    # A request arrived as the wait ended: answer it rather than drop it.
                    conn.data_ready = True
                    self.enqueue_req(conn)
                else:
                    self.close_between_requests(conn)
        while self.closing and self.closing[0].deadline <= now:
            self._closed(self.closing.popleft())

    def close_between_requests(self, conn: Any) -> None:
        """Shut our side (TLS close_notify, then FIN) and let the poller wait for the client's."""
        sock = _raw(conn.sock)
        try:
            sock.setblocking(False)
            if isinstance(sock, ssl.SSLSocket):
                # Sends close_notify; raises while the client's has not come yet, which is usual.
                with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                    sock.unwrap()
            sock.shutdown(socket.SHUT_WR)
            closing = _Closing(sock, time.monotonic() + CLOSE_LINGER)
            self.poller.register(sock, selectors.EVENT_READ, partial(self._on_closing_readable, closing))
        except (OSError, ValueError):  # already closed, or the client reset it
            self._closed(_Closing(sock, 0.0))
            return
        self.closing.append(closing)

    def _on_closing_readable(self, closing: _Closing, _fileobj: Any) -> None:
        try:
            data = closing.sock.recv(CLOSE_DRAIN_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        closing.drained += len(data)
        if not data or closing.drained >= CLOSE_DRAIN_BYTES:
            self.closing.remove(closing)
            self._closed(closing)

    def _closed(self, closing: _Closing) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(closing.sock)
        with contextlib.suppress(OSError):
            closing.sock.close()
        self.nr_conns -= 1
