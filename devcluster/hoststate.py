"""What a real node changes on the host, recorded before it starts and undone after it stops.

A kubelet, containerd, runc, the CNI plugins and kube-proxy change host-wide state: sysctls
(``vm.overcommit_memory``, ``kernel.panic``, ``net.ipv4.ip_forward``, ...), iptables chains and
rules (and, with the nf_tables backend, whole nftables tables), cgroups, mounts, and files at fixed
paths (``/run/containerd``, ``/var/lib/cni``, ``/var/lib/kubelet/device-plugins``, ...).
:class:`HostSnapshot` records all of that before the node starts; :func:`restore` undoes every
difference afterwards and returns what it did. Only what did not exist before is removed, so state
that was there already (another containerd, the host's own firewall rules) is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: Host sysctls the node's programs are known to set (kubelet: the first six; the CNI bridge
#: plugin: ip_forward; kube-proxy, if not told otherwise: route_localnet and conntrack).
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv4/conf/default/forwarding",
    "net/ipv6/conf/all/forwarding",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)
IPTABLES = ("iptables", "ip6tables")
BUILTIN_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read_sysctl(key: str) -> str | None:
    try:
        return Path("/proc/sys", key).read_text().strip()
    except OSError:
        return None


def _iptables_rules(binary: str) -> dict[str, list[str]]:
    """table -> its ``:CHAIN`` and ``-A`` lines from ``<binary>-save`` (counters dropped)."""
    save = shutil.which(f"{binary}-save")
    if save is None:
        return {}
    out = subprocess.run([save], capture_output=True, text=True, check=False).stdout
    tables: dict[str, list[str]] = {}
    table = ""
    for line in out.splitlines():
        if line.startswith("*"):
            table = line[1:]
            tables[table] = []
        elif line.startswith(":") and table:
            tables[table].append(line.split()[0])  # ":CHAIN" without policy and counters
        elif line.startswith("-A ") and table:
            tables[table].append(line)
    return tables


def _nft_tables() -> list[str] | None:
    nft = shutil.which("nft")
    if nft is None:
        return None
    out = subprocess.run([nft, "list", "tables"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return None
    return sorted(line.removeprefix("table ").strip() for line in out.stdout.splitlines() if line.strip())


def _cgroup_children() -> dict[str, list[str]]:
    """Each cgroup v1/v2 hierarchy mounted under /sys/fs/cgroup -> its top-level cgroups."""
    found: dict[str, list[str]] = {}
    if not CGROUP_ROOT.is_dir():
        return found
    candidates = [CGROUP_ROOT, *(p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink())]
    for hierarchy in candidates:
        if not (hierarchy / "cgroup.procs").exists():
            continue
        found[str(hierarchy)] = sorted(c.name for c in hierarchy.iterdir() if c.is_dir())
    return found


def mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) > 4:
                points.append(parts[4].replace("\\040", " "))
    return points


@dataclass
class HostSnapshot:
    """The host state a node may change, as it was before the node started."""

    sysctls: dict[str, str | None] = field(default_factory=dict)
    iptables: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    nft_tables: list[str] | None = None
    cgroups: dict[str, list[str]] = field(default_factory=dict)
    #: fixed paths -> whether they existed
    paths: dict[str, bool] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)
    #: network interfaces that existed
    links: list[str] = field(default_factory=list)

    @classmethod
    def take(cls, fixed_paths: list[str]) -> HostSnapshot:
        return cls(
            sysctls={key: _read_sysctl(key) for key in SYSCTLS},
            iptables={binary: _iptables_rules(binary) for binary in IPTABLES},
            nft_tables=_nft_tables(),
            cgroups=_cgroup_children(),
            paths={p: os.path.lexists(p) for p in fixed_paths},
            mounts=mount_points(),
            links=sorted(os.listdir("/sys/class/net")),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> HostSnapshot:
        return cls(**json.loads(text))

    def differences(self) -> list[str]:
        """What differs on the host now from this snapshot (empty when all is as it was)."""
        now = HostSnapshot.take(list(self.paths))
        diffs = [
            f"sysctl {k}: {self.sysctls[k]} -> {now.sysctls[k]}"
            for k in self.sysctls
            if now.sysctls.get(k) != self.sysctls[k]
        ]
        for binary in IPTABLES:
            before, after = self.iptables.get(binary, {}), now.iptables.get(binary, {})
            for table in sorted(set(before) | set(after)):
                added = Counter(after.get(table, [])) - Counter(before.get(table, []))
                removed = Counter(before.get(table, [])) - Counter(after.get(table, []))
                diffs += [f"{binary} -t {table}: added {line}" for line in added.elements()]
                diffs += [f"{binary} -t {table}: removed {line}" for line in removed.elements()]
        if self.nft_tables is not None and now.nft_tables is not None:
            diffs += [f"nftables: new table {t}" for t in sorted(set(now.nft_tables) - set(self.nft_tables))]
        for hierarchy, children in now.cgroups.items():
            new = sorted(set(children) - set(self.cgroups.get(hierarchy, children)))
            diffs += [f"cgroup {hierarchy}/{c}" for c in new]
        diffs += [
            f"path {p} now exists" for p, existed in self.paths.items() if not existed and os.path.lexists(p)
        ]
        diffs += [f"mount {m}" for m in sorted(set(now.mounts) - set(self.mounts))]
        diffs += [f"network interface {link}" for link in sorted(set(now.links) - set(self.links))]
        return diffs


def _run(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def restore_sysctls(snapshot: HostSnapshot) -> list[str]:
    done = []
    for key, value in snapshot.sysctls.items():
        if value is None or _read_sysctl(key) == value:
            continue
        try:
            Path("/proc/sys", key).write_text(value)
            done.append(f"sysctl {key.replace('/', '.')}={value}")
        except OSError as exc:
            done.append(f"sysctl {key.replace('/', '.')}: could not restore {value}: {exc}")
    return done


def restore_iptables(snapshot: HostSnapshot) -> list[str]:
    """Delete every rule and chain that was not there before (the host's own stay untouched)."""
    done = []
    for binary in IPTABLES:
        if shutil.which(binary) is None:
            continue
        before = snapshot.iptables.get(binary, {})
        now = _iptables_rules(binary)
        for table, lines in now.items():
            old = Counter(before.get(table, []))
            # Rules first (they may jump to new chains); `-D` with a full rule spec deletes one match.
            for line, count in (Counter(x for x in lines if x.startswith("-A ")) - old).items():
                for _ in range(count):
                    if _run([binary, "-w", "-t", table, "-D", *shlex.split(line[3:])]):
                        done.append(f"{binary} -t {table} -D {line[3:]}")
            new_chains = [
                x[1:] for x in lines if x.startswith(":") and x not in old and x[1:] not in BUILTIN_CHAINS
            ]
            for chain in new_chains:
                _run([binary, "-w", "-t", table, "-F", chain])
            for chain in new_chains:
                if _run([binary, "-w", "-t", table, "-X", chain]):
                    done.append(f"{binary} -t {table} -X {chain}")
    if snapshot.nft_tables is not None:
        now_tables = _nft_tables() or []
        for table in sorted(set(now_tables) - set(snapshot.nft_tables)):
            # Only tables left empty by the deletions above (iptables-nft creates a table on first use).
            listing = subprocess.run(
                ["nft", "-j", "list", "table", *table.split()], capture_output=True, text=True, check=False
            ).stdout
            try:
                items = json.loads(listing).get("nftables", [])
            except ValueError:
                items = [{"rule": "unreadable"}]
            if any("rule" in item for item in items):
                done.append(f"nftables table {table} kept: it still holds rules")
                continue
            if _run(["nft", "delete", "table", *table.split()]):
                done.append(f"nft delete table {table}")
    return done


def flush_conntrack(ranges: list[str] | tuple[str, ...]) -> list[str]:
    """Forget the kernel's connection tracking entries to or from these ranges."""
    if shutil.which("conntrack") is None:
        return []
    done = []
    for cidr in ranges:
        for flag in ("--orig-src", "--orig-dst"):
            if _run(["conntrack", "-D", flag, cidr]):
                done.append(f"conntrack -D {flag} {cidr}")
    return done


def unmount_new(snapshot: HostSnapshot, under: list[str]) -> list[str]:
    """Unmount mounts made since the snapshot below any of ``under`` (deepest first)."""
    done = []
    before = set(snapshot.mounts)
    prefixes = [p.rstrip("/") + "/" for p in under]
    for _ in range(3):  # stacked mounts on one point need one umount each
        new = [
            m for m in mount_points() if m not in before and any((m + "/").startswith(p) for p in prefixes)
        ]
        if not new:
            break
        for point in sorted(set(new), key=len, reverse=True):
            if _run(["umount", point]) or _run(["umount", "-l", point]):
                done.append(f"umount {point}")
    return done


def kill_cgroup_processes(paths: list[Path]) -> list[str]:
    """SIGKILL every process left in these cgroups (and below): containers of a stopped node."""
    done = []
    for root in paths:
        if not root.is_dir():
            continue
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(int(pid), 9)
                        done.append(f"killed pid {pid} left in {procs.parent}")
    return done


def remove_cgroups(snapshot: HostSnapshot) -> list[str]:
    """rmdir the cgroups (whole trees, deepest first) that were created since the snapshot."""
    done = []
    for hierarchy, children in _cgroup_children().items():
        old = set(snapshot.cgroups.get(hierarchy, children))
        for name in sorted(set(children) - old):
            top = Path(hierarchy) / name
            dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
            for directory in [*dirs, top]:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            done.append(f"rmdir {top}" if not top.exists() else f"cgroup {top} still busy")
    return done


def remove_new_paths(snapshot: HostSnapshot) -> list[str]:
    done = []
    for path, existed in snapshot.paths.items():
        if existed or not os.path.lexists(path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
        done.append(f"removed {path}" if not os.path.lexists(path) else f"could not remove {path}")
    return done


def delete_new_links(snapshot: HostSnapshot, names: list[str]) -> list[str]:
    done = []
    for name in names:
        if (
            name not in snapshot.links
            and os.path.exists(f"/sys/class/net/{name}")
            and _run(["ip", "link", "delete", name])
        ):
            done.append(f"ip link delete {name}")
    return done
