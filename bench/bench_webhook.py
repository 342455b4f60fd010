"""Admission webhook under load: the real `mig-guard webhook` (gunicorn, TLS) on loopback.

Concurrent keep-alive HTTPS clients (processes x threads, one reused `http.client` connection
each) send a mix of AdmissionReviews: accepted layout changes, denied ones (typo, layout that
does not fit) and unrelated Node updates, to /validate and /mutate. Two runs per server:
saturation (closed loop, as fast as the clients go: throughput) and a fixed rate (open loop,
default 1,000/s: p50/p99 latency at that rate). The same runs against the same server in
`--floor` mode (allow-all without looking) give the floor; the ratios compare the two.
RSS per gunicorn worker is read from /proc after the runs.

The load generator runs on the same machine and competes for the same cores: with 2 cores
the saturation figure is a floor for what the server could do alone. Targets (2 cores):
>= 1,000 admissions/s, p99 <= 10 ms at 1,000/s, p50 within 1.5x of the floor.

A third run repeats the fixed rate while slow clients (TLS, a partial body, then silence) and
idle connections (TCP, nothing sent) hold on: admission for everyone else must not wait for them.

    python bench/bench_webhook.py [--workers 2] [--threads N] [--rate 1000] [--seconds 5]
        [--slow-clients 2] [--idle-clients 4] [--server-arg=...]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devcluster.pki import CertificateAuthority
from migcore import keys

CONFIG = Path(__file__).parents[1] / "migcore" / "data" / "default-mig-parted-config.yaml"
MIG_GUARD = str(Path(sys.executable).with_name("mig-guard"))
TARGET_RATE = 1000.0
TARGET_P99_MS = 10.0
TARGET_P50_RATIO = 1.5


def _node(labels: dict[str, str]) -> dict[str, Any]:
    base = {
        "nvidia.com/gpu.present": "true",
        keys.LABEL_GPU_PRODUCT: "NVIDIA-A100-SXM4-40GB",
        keys.LABEL_GPU_COUNT: "8",
        "kubernetes.io/hostname": "gpu-7",
        "kubernetes.io/os": "linux",
        "nvidia.com/gfd.timestamp": "1700000000",
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "gpu-7",
            "labels": {**base, **labels},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"podCIDR": "10.0.7.0/24"},
        "status": {"capacity": {"cpu": "64", "nvidia.com/gpu": "8"}},
    }


def _review(new_labels: dict[str, str], old_labels: dict[str, str], uid: str) -> bytes:
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Node"},
                "resource": {"group": "", "version": "v1", "resource": "nodes"},
                "operation": "UPDATE",
                "name": "gpu-7",
                "userInfo": {"username": "admin", "groups": ["system:masters", "system:authenticated"]},
                "object": _node(new_labels),
                "oldObject": _node(old_labels),
                "dryRun": False,
            },
        }
    ).encode()


def request_mix() -> list[tuple[str, bytes]]:
    """10 requests: 4 accepted (validate+mutate), 3 denied, 3 unrelated; in a fixed order."""
    before = {keys.LABEL_MIG_CONFIG: "all-disabled"}
    accepted = {keys.LABEL_MIG_CONFIG: "all-1g.5gb"}
    typo = {keys.LABEL_MIG_CONFIG: "all-1g.5gbb"}
    misfit = {keys.LABEL_MIG_CONFIG: "all-3g.40gb"}
    unrelated = {**before, "nvidia.com/gfd.timestamp": "1700000060"}
    return [
        ("/validate", _review(accepted, before, "a1")),
        ("/mutate", _review(accepted, before, "a2")),
        ("/validate", _review(typo, before, "d1")),
        ("/validate", _review(unrelated, before, "u1")),
        ("/mutate", _review(accepted, before, "a3")),
        ("/validate", _review(misfit, before, "d2")),
        ("/mutate", _review(unrelated, before, "u2")),
        ("/validate", _review(accepted, before, "a4")),
        ("/mutate", _review(typo, before, "d3")),
        ("/validate", _review(unrelated, before, "u3")),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One `mig-guard webhook` process (optionally the floor) with its own certificate."""

    def __init__(self, workdir: Path, floor: bool, workers: int, threads: int, extra: list[str]) -> None:
        ca = CertificateAuthority.create("bench-ca")
        self.ca_file = workdir / "ca.crt"
        self.ca_file.write_bytes(ca.cert_pem)
        cert, key = ca.issue_server().write(workdir, "tls")
        self.port = free_port()
        argv = [MIG_GUARD, "webhook", "--listen", f"127.0.0.1:{self.port}", "--tls-cert-file", str(cert)]
        argv += ["--tls-key-file", str(key), "--mig-config-file", str(CONFIG)]
        argv += ["--workers", str(workers), "--threads", str(threads)]
        argv += extra
        if floor:
            argv.append("--floor")
        self.log = (workdir / ("floor.log" if floor else "webhook.log")).open("wb")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=self.log)
        self.workers = workers
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {self.log.name}")
            time.sleep(0.2)
        # Every worker up (each has answered /readyz once its app was built).
        while len(self.worker_pids()) < workers:
            time.sleep(0.1)
        time.sleep(1.0)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _ready(self) -> bool:
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context(), timeout=2)
            conn.request("GET", "/readyz")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return [int(p) for p in out.stdout.split()]

    def rss_mib(self) -> list[float]:
        sizes = []
        for pid in self.worker_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) / 1024)
        return sizes

    def cpu_seconds(self) -> float:
        """User + system CPU time of all workers so far (from /proc; independent of other load)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.worker_pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)
        self.log.close()


def _client(port: int, ca_file: str, threads: int, rate: float | None, seconds: float, out: Any) -> None:
    """One load process: `threads` keep-alive connections; closed loop (rate None) or paced."""
    import threading  # noqa: PLC0415 - per process, after fork

    mix = request_mix()
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0]
    context = ssl.create_default_context(cafile=ca_file)
    start = time.monotonic() + 0.2
    end = start + seconds

    def run(index: int) -> None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        mine = latencies[index]
        interval = threads / rate if rate else 0.0
        next_at = start + (interval * index / threads if rate else 0.0)
        i = index
        while True:
            if rate:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at += interval
            now = time.monotonic()
            if now >= end:
                break
            path, body = mix[i % len(mix)]
            i += 1
            sent = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors[0] += 1
            except (OSError, http.client.HTTPException):
                errors[0] += 1
                conn.close()
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
                continue
            mine.append(time.perf_counter() - sent)
        conn.close()

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put(([x for xs in latencies for x in xs], errors[0]))


class Attackers:
    """Slow and idle clients for the whole of a run, the way a stalled or hostile peer behaves.

    Slow: a TLS connection that sends the headers and one byte of a 100 kB body, then nothing (one
    closed by the server is replaced at once). Idle: TCP connections that never send a byte, all
    replaced every second (each new one is a connection the server must decide to wait for).
    """

    def __init__(self, port: int, ca_file: Path, slow: int, idle: int) -> None:
        import threading  # noqa: PLC0415

        self.port, self.ca_file, self.slow, self.idle = port, ca_file, slow, idle
        self.stop_event = threading.Event()
        self.closed_by_server = 0
        self.threads = [threading.Thread(target=self._slow, daemon=True) for _ in range(slow)]
        if idle:
            self.threads.append(threading.Thread(target=self._idle, daemon=True))

    def __enter__(self) -> Attackers:
        for thread in self.threads:
            thread.start()
        time.sleep(0.5)  # let them take their places before the measured load starts
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(10)

    def _slow(self) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        head = (
            b"POST /validate HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{"
        )
        while not self.stop_event.is_set():
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
                ):
                    tls.sendall(head)
                    tls.settimeout(0.5)
                    while not self.stop_event.is_set():
                        try:
                            if not tls.recv(4096):
                                break
                        except TimeoutError:
                            continue
                    else:
                        return
                self.closed_by_server += 1
            except OSError:
                time.sleep(0.1)

    def _idle(self) -> None:
        held: list[socket.socket] = []
        while not self.stop_event.is_set():
            for sock in held:
                sock.close()
            held = []
            for _ in range(self.idle):
                with contextlib.suppress(OSError):
                    held.append(socket.create_connection(("127.0.0.1", self.port), timeout=5))
            self.stop_event.wait(1.0)
        for sock in held:
            sock.close()


def drive(
    server: Server, processes: int, threads: int, rate: float | None, seconds: float
) -> dict[str, float]:
    """Run the load; returns throughput, p50, p99 (ms) and errors."""
    queue: Any = mp.get_context("fork").Queue()
    per_process = rate / processes if rate else None
    procs = [
        mp.get_context("fork").Process(
            target=_client, args=(server.port, str(server.ca_file), threads, per_process, seconds, queue)
        )
        for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    samples: list[float] = []
    errors = 0
    for _ in procs:
        got, failed = queue.get(timeout=seconds + 60)
        samples.extend(got)
        errors += failed
    for proc in procs:
        proc.join()
    samples.sort()
    if not samples:
        return {"rps": 0.0, "p50": float("nan"), "p99": float("nan"), "errors": float(errors)}
    return {
        "rps": len(samples) / seconds,
        "p50": statistics.median(samples) * 1000,
        "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000,
        "errors": float(errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker")
    parser.add_argument("--clients", type=int, default=2, help="load processes")
    parser.add_argument("--connections", type=int, default=4, help="keep-alive connections per load process")
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="requests/s of the fixed-rate run")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra `mig-guard webhook` argument"
    )
    parser.add_argument("--slow-clients", type=int, default=2, help="stalled TLS clients in the attacked run")
    parser.add_argument(
        "--idle-clients", type=int, default=4, help="idle TCP connections in the attacked run"
    )
    args = parser.parse_args(argv)

    print(
        f"cores {os.cpu_count()}; gunicorn gthread {args.workers} workers x {args.threads} threads; "
        f"load {args.clients} processes x {args.connections} keep-alive connections (same machine)"
    )
    results: dict[str, dict[str, dict[str, float]]] = {}
    rss: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-webhook-") as tmp:
        for name, floor in (("floor", True), ("webhook", False)):
            workdir = Path(tmp) / name
            workdir.mkdir()
            server = Server(workdir, floor, args.workers, args.threads, args.server_arg)
            try:
                drive(server, args.clients, args.connections, None, 1.0)  # warm-up (caches, TLS sessions)
                cpu_before = server.cpu_seconds()
                saturation = drive(server, args.clients, args.connections, None, args.seconds)
                saturation["cpu_us"] = (
                    (server.cpu_seconds() - cpu_before) / (saturation["rps"] * args.seconds) * 1e6
                )
                results[name] = {
                    "saturation": saturation,
                    "fixed": drive(server, args.clients, args.connections, args.rate, args.seconds),
                }
                if not floor and (args.slow_clients or args.idle_clients):
                    with Attackers(
                        server.port, server.ca_file, args.slow_clients, args.idle_clients
                    ) as attack:
                        results[name]["attacked"] = drive(
                            server, args.clients, args.connections, args.rate, args.seconds
                        )
                    results[name]["attacked"]["cut_off"] = float(attack.closed_by_server)
                rss[name] = server.rss_mib()
            finally:
                server.stop()

    print(f"\n{'run':<40}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    attacked = f"@{args.rate:.0f}/s, {args.slow_clients} slow + {args.idle_clients} idle clients"
    labels = {"saturation": "saturation", "fixed": f"@{args.rate:.0f}/s", "attacked": attacked}
    for name in ("floor", "webhook"):
        for run, r in results[name].items():
            label = f"{name} {labels[run]}"
            print(f"{label:<40}{r['rps']:>10.0f}{r['p50']:>10.2f}{r['p99']:>10.2f}{r['errors']:>8.0f}")
    if "attacked" in results["webhook"]:
        cut = results["webhook"]["attacked"]["cut_off"]
        print(f"slow clients cut off by the server during the attacked run: {cut:.0f}")
    for name in ("floor", "webhook"):
        print(f"RSS per worker ({name}): " + ", ".join(f"{m:.1f} MiB" for m in rss[name]))
    wf, ff = results["webhook"]["fixed"], results["floor"]["fixed"]
    ws, fs = results["webhook"]["saturation"], results["floor"]["saturation"]
    for name in ("floor", "webhook"):
        print(
            f"server CPU per request ({name}, saturation run): {results[name]['saturation']['cpu_us']:.0f} us"
        )
    load = os.getloadavg()
    print(
        f"machine load average during the runs: {load[0]:.1f} (1 min), {load[1]:.1f} (5 min) on {os.cpu_count()} cores"
    )
    print("\nratios webhook/floor:")
    print(f"  server CPU per request {ws['cpu_us'] / fs['cpu_us']:.2f}x")
    print(f"  saturation throughput {ws['rps'] / fs['rps']:.2f}x, p50 {ws['p50'] / fs['p50']:.2f}x")
    print(f"  @{args.rate:.0f}/s p50 {wf['p50'] / ff['p50']:.2f}x, p99 {wf['p99'] / ff['p99']:.2f}x")
    checks = [
        (f"saturation >= {TARGET_RATE:.0f} admissions/s", ws["rps"] >= TARGET_RATE),
        (f"achieved rate >= {0.95 * args.rate:.0f}/s in the fixed run", wf["rps"] >= 0.95 * args.rate),
        (f"p99 <= {TARGET_P99_MS:.0f} ms at {args.rate:.0f}/s", wf["p99"] <= TARGET_P99_MS),
        (
            f"p50 within {TARGET_P50_RATIO}x of the floor at {args.rate:.0f}/s",
            wf["p50"] <= TARGET_P50_RATIO * ff["p50"],
        ),
        ("no errors", wf["errors"] + ws["errors"] == 0),
    ]
    if "attacked" in results["webhook"]:
        wa = results["webhook"]["attacked"]
        checks += [
            (f"with slow and idle clients: p99 <= {TARGET_P99_MS:.0f} ms", wa["p99"] <= TARGET_P99_MS),
            ("with slow and idle clients: no errors", wa["errors"] == 0),
        ]
    print("\ntargets:")
    for text, ok in checks:
        print(f"  {'met ' if ok else 'MISSED'} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
