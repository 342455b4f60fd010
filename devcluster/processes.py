"""Child processes that are always torn down.

Each process runs in its own process group (``start_new_session``), writes stdout+stderr to a log
file, and is registered in a module-wide registry. The registry is emptied (SIGTERM to each group,
then SIGKILL) on normal stop, at interpreter exit (``atexit``) and on SIGTERM/SIGHUP (the previous
handler runs afterwards). SIGINT becomes ``KeyboardInterrupt`` as usual, so context managers and
pytest fixtures tear down, and ``atexit`` catches the rest. On Linux the children additionally get
``PR_SET_PDEATHSIG=SIGKILL``, so even a SIGKILLed parent leaves no control plane behind (note: that
signal fires when the *thread* that started the child exits: start control planes from the main
thread or from a thread that lives as long as they should).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

_registry: set[ManagedProcess] = set()
_lock = threading.Lock()
_state = {"handlers_installed": False}
_previous: dict[int, Any] = {}


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def stop_all() -> None:
    """Stop every process still registered (newest first)."""
    with _lock:
        procs = sorted(_registry, key=lambda p: p.started_at, reverse=True)
    for proc in procs:
        proc.stop(timeout=5.0)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    stop_all()
    previous = _previous.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:  # default action: re-raise with the default handler so the exit status is right
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    if _state["handlers_installed"]:
        return
    _state["handlers_installed"] = True
    atexit.register(stop_all)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit + pdeathsig remain
    for sig in (signal.SIGTERM, signal.SIGHUP):
        _previous[sig] = signal.getsignal(sig)
        signal.signal(sig, _on_signal)


class ManagedProcess:
    """One child process with a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.started_at = 0.0
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        _install_handlers()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"### {time.strftime('%H:%M:%S')} starting: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None,  # noqa: PLW1509
            )
        self.started_at = time.monotonic()
        with _lock:
            _registry.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def poll(self) -> int | None:
        """Exit code if the process has exited, else None (also None if never started)."""
        return self._popen.poll() if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def _signal_group(self, sig: int) -> None:
        if self._popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` s; returns the exit code."""
        with _lock:
            _registry.discard(self)
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._popen.wait(timeout=10)
        # Anything left in the group (grandchildren) goes too.
        self._signal_group(signal.SIGKILL)
        return self._popen.returncode

    def log_tail(self, lines: int = 50) -> str:
        return tail(self.log_path, lines)


def tail(path: Path, lines: int = 50, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of a (possibly large) text file; '' if it does not exist."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
    alive: Callable[[], None] | None = None,
) -> None:
    """Poll ``condition`` every ``interval`` s until it is true; ``alive`` may raise to stop early."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        with contextlib.suppress(Exception):
            if condition():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
