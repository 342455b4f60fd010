"""Container images for a real node, made without any registry.

* the pod sandbox (``pause``) image: :file:`devcluster/pause.go`, built static with Go;
* a Debian base image with Python: a root file system from ``mmdebstrap`` (Debian packages only);
* a Dockerfile's image: built by ``buildah bud`` (daemonless) with that base image as the
  ``FROM`` build argument, without network: Python packages come from a local wheelhouse that
  ``pip download`` fills on the host (through pip's usual index) and that the build sees as
  ``/wheelhouse`` with a pip.conf saying ``no-index``.

Every image is an OCI archive (:mod:`devcluster.oci`) cached in ``~/.cache/mig-guard/node``
(``$MIG_GUARD_NODE_CACHE``), named by a hash of its inputs, so a warm run builds nothing.
``ctr images import`` puts an archive into a node's containerd (:meth:`devcluster.node.RealNode.import_image`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from devcluster import oci

PAUSE_SOURCE = Path(__file__).with_name("pause.go")
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: The stand-in for the Dockerfile's python:3.11-slim-bookworm: Debian's Python 3.11.
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "python-is-python3")
#: The Python and platform of that base, for the wheels `pip download` picks.
BASE_PYTHON = "3.11"
BASE_GLIBC_MINOR = 36
#: What the Dockerfile installs besides the project's own dependencies.
DOCKERFILE_EXTRA_REQUIREMENTS = ("pip>=24",)
#: Paths buildah (and the runc it calls) write outside its --root/--runroot; removed again when
#: a build created them.
BUILDAH_HOST_PATHS = ("/run/runc", "/etc/cni", "/var/lib/containers")


class ImageBuildError(RuntimeError):
    """An image could not be built; the message says which step and why."""


@dataclass(frozen=True)
class ImageArchive:
    """An OCI archive on disk and the image name recorded in it."""

    name: str
    path: Path


def cache_dir() -> Path:
    env = os.environ.get("MIG_GUARD_NODE_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "mig-guard" / "node"


@contextlib.contextmanager
def _locked(name: str) -> Iterator[Path]:
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f".{name}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield directory
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _drop_older(directory: Path, stem: str, keep: Path) -> None:
    """Old builds of the same image are dead weight once the new one exists."""
    for old in directory.glob(f"{stem}-*"):
        if old != keep and not old.name.endswith(".lock"):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def _run(argv: Sequence[str], what: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")
    result: subprocess.CompletedProcess[str] = proc
    return result


# ------------------------------------------------------------------------------------ pause


def pause_image() -> ImageArchive:
    """The sandbox image: a static ``/pause`` (Go, no cgo) as the only file and the entry point."""
    go = shutil.which("go")
    if go is None:
        raise ImageBuildError("`go` is not on PATH (needed to build the pod sandbox's pause binary)")
    version = _run([go, "env", "GOVERSION"], "go env").stdout.strip()
    key = _digest(PAUSE_SOURCE.read_bytes(), version)
    name = f"mig-guard.local/pause:{key}"
    with _locked("pause") as directory:
        out = directory / f"pause-{key}.oci.tar"
        if out.exists():
            return ImageArchive(name, out)
        with tempfile.TemporaryDirectory(prefix="pause-build-") as tmp_name:
            tmp = Path(tmp_name)
            (tmp / "go.mod").write_text("module localbuild.invalid/pause\n\ngo 1.21\n")
            shutil.copy(PAUSE_SOURCE, tmp / "main.go")
            env = {
                **os.environ,
                "CGO_ENABLED": "0",
                "GOTOOLCHAIN": "local",
                "GOWORK": "off",
                "GOFLAGS": "-trimpath",
            }
            _run(
                [go, "build", "-ldflags=-s -w", "-o", str(tmp / "pause"), "."],
                "building pause",
                cwd=tmp,
                env=env,
            )
            layer = oci.files_layer({"/pause": tmp / "pause"}, tmp / "layer.tar")
            oci.write_archive(layer, name, out, entrypoint=["/pause"])
        _drop_older(directory, "pause", out)
    return ImageArchive(name, out)


# ------------------------------------------------------------------------------ Debian base


def _apt_sources() -> list[str]:
    """The host's Debian source list (deb822) if it has one, so a mirror the host uses is used
    here too; otherwise mmdebstrap's default mirror."""
    host = Path("/etc/apt/sources.list.d/debian.sources")
    return [str(host)] if host.is_file() else []


def debian_base_image() -> ImageArchive:
    """Debian ``bookworm`` (minbase) with Python 3.11, venv and ``python``: the local stand-in for
    the Dockerfile's ``python:3.11-slim-bookworm`` base."""
    key = _digest(DEBIAN_SUITE, *DEBIAN_PACKAGES, *(Path(p).read_text() for p in _apt_sources()), "v1")
    name = f"mig-guard.local/debian-python:{DEBIAN_SUITE}-{key}"
    with _locked("debian") as directory:
        out = directory / f"debian-python-{key}.oci.tar"
        if out.exists():
            return ImageArchive(name, out)
        if shutil.which("mmdebstrap") is None:
            raise ImageBuildError(
                "mmdebstrap is missing (Debian package mmdebstrap; see devcluster.hostprep)"
            )
        with tempfile.TemporaryDirectory(prefix="debian-rootfs-", dir=directory) as tmp_name:
            rootfs = Path(tmp_name) / "rootfs.tar"
            _run(
                [
                    "mmdebstrap",
                    "--variant=minbase",
                    f"--include={','.join(DEBIAN_PACKAGES)}",
                    '--aptopt=Acquire::Languages "none"',
                    "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/doc/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*",
                    DEBIAN_SUITE,
                    str(rootfs),
                    *_apt_sources(),
                ],
                "mmdebstrap",
            )
            oci.write_archive(rootfs, name, out, env={"LANG": "C.UTF-8"}, cmd=["python3"])
        _drop_older(directory, "debian-python", out)
    return ImageArchive(name, out)


# ------------------------------------------------------------------------------- wheelhouse


def project_requirements(project: Path) -> list[str]:
    """What a Dockerfile that pip-installs ``project`` needs: its dependencies and build system."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())
    return [
        *DOCKERFILE_EXTRA_REQUIREMENTS,
        *meta.get("build-system", {}).get("requires", []),
        *meta.get("project", {}).get("dependencies", []),
    ]


def _platforms() -> list[str]:
    tags = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
    return tags + [f"manylinux_2_{minor}_x86_64" for minor in range(5, BASE_GLIBC_MINOR + 1)]


def wheelhouse(project: Path) -> Path:
    """A directory of wheels for the base image's Python that satisfies :func:`project_requirements`."""
    requirements = project_requirements(project)
    key = _digest(BASE_PYTHON, *requirements)
    with _locked("wheelhouse") as directory:
        out = directory / f"wheelhouse-{key}"
        if (out / ".complete").exists():
            return out
        shutil.rmtree(out, ignore_errors=True)
        platform_args = [arg for tag in _platforms() for arg in ("--platform", tag)]
        _run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                "--only-binary=:all:", "--implementation", "cp", "--python-version", BASE_PYTHON,
                *platform_args, "--dest", str(out), *requirements,
            ],
            "pip download (wheelhouse)",
        )  # fmt: skip
        (out / ".complete").write_text("\n".join(requirements) + "\n")
        _drop_older(directory, "wheelhouse", out)
    return out


# ------------------------------------------------------------------------------- Dockerfile


def context_digest(context: Path) -> str:
    """Hash of every file git would consider part of the tree (tracked or not ignored): a change
    anywhere rebuilds. Without git the digest is unique, so the image is always rebuilt."""
    proc = subprocess.run(
        ["git", "-C", str(context), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        return _digest(str(time.time_ns()))
    h = hashlib.sha256()
    for rel in sorted(set(proc.stdout.decode().split("\0")) - {""}):
        path = context / rel
        if path.is_file():
            h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _host_paths_restored(paths: Sequence[str]) -> Iterator[None]:
    """Remove what a build created at fixed host paths, and the cgroups of its RUN steps that
    runc left when a step failed."""
    existed = {p: os.path.lexists(p) for p in paths}
    cgroups = set(CGROUP_ROOT.glob("*/buildah-*"))
    try:
        yield
    finally:
        for path, was in existed.items():
            if not was and os.path.lexists(path):
                shutil.rmtree(path, ignore_errors=True)
        for cgroup in set(CGROUP_ROOT.glob("*/buildah-*")) - cgroups:
            with contextlib.suppress(OSError):
                cgroup.rmdir()


def build_dockerfile(
    context: Path,
    name: str,
    base: ImageArchive,
    *,
    base_arg: str = "PYTHON_IMAGE",
    build_args: Mapping[str, str] | None = None,
) -> ImageArchive:
    """``buildah bud`` the Dockerfile in ``context`` with ``--build-arg <base_arg>=oci-archive:<base>``,
    no network, pip served from :func:`wheelhouse`; the result as an OCI archive named ``name``."""
    if shutil.which("buildah") is None:
        raise ImageBuildError("buildah is missing (Debian package buildah; see devcluster.hostprep)")
    wheels = wheelhouse(context)
    key = _digest(
        name, context_digest(context), base.path.name, wheels.name, repr(sorted((build_args or {}).items()))
    )
    stem = name.rsplit("/", 1)[-1].split(":", maxsplit=1)[0]
    with _locked(stem) as directory:
        out = directory / f"{stem}-{key}.oci.tar"
        if out.exists():
            return ImageArchive(name, out)
        with (
            tempfile.TemporaryDirectory(prefix="buildah-", dir=directory) as tmp_name,
            _host_paths_restored(BUILDAH_HOST_PATHS),
        ):
            tmp = Path(tmp_name)
            pip_conf = tmp / "pip.conf"
            pip_conf.write_text("[global]\nno-index = true\nfind-links = /wheelhouse\n")
            storage = [
                "--root",
                str(tmp / "root"),
                "--runroot",
                str(tmp / "run"),
                "--storage-driver",
                "overlay",
            ]
            args = [
                f"--build-arg={k}={v}"
                for k, v in {base_arg: f"oci-archive:{base.path}", **(build_args or {})}.items()
            ]
            try:
                _run(
                    [
                        "buildah", *storage, "bud", "--network", "none",
                        f"--volume={wheels}:/wheelhouse:ro", f"--volume={pip_conf}:/etc/pip.conf:ro",
                        *args, "--tag", name, "--file", str(context / "Dockerfile"), str(context),
                    ],
                    "buildah bud",
                )  # fmt: skip
                partial = out.with_name(out.name + ".partial")
                _run(["buildah", *storage, "push", name, f"oci-archive:{partial}:{name}"], "buildah push")
                partial.replace(out)
            finally:
                subprocess.run(
                    ["buildah", *storage, "rmi", "--all", "--force"], capture_output=True, check=False
                )
        _drop_older(directory, stem, out)
    return ImageArchive(name, out)
