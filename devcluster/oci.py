"""Single-layer OCI image archives, written without a registry or an image builder.

An archive holds ``oci-layout``, ``index.json`` and ``blobs/sha256/`` (the OCI image layout, in a
tar), which ``ctr images import`` and buildah's ``oci-archive:`` transport both read. The index
names the image (``org.opencontainers.image.ref.name`` and ``io.containerd.image.name``).
The output depends only on the inputs (gzip without a timestamp, a fixed creation date), so the
same inputs give the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: A fixed creation time keeps digests stable across rebuilds of the same inputs.
CREATED = "1970-01-01T00:00:00Z"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_layer(files: Mapping[str, Path], out: Path) -> Path:
    """A layer tar holding ``files`` (path in the image -> file on disk), owned by root."""
    with tarfile.open(out, "w") as tar:
        for dest, src in sorted(files.items()):
            info = tar.gettarinfo(str(src), arcname=dest.lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with src.open("rb") as fh:
                tar.addfile(info, fh)
    return out


def write_archive(
    layer_tar: Path,
    name: str,
    out: Path,
    *,
    entrypoint: Sequence[str] | None = None,
    cmd: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
) -> str:
    """Write an OCI archive of one image with ``layer_tar`` (uncompressed) as its only layer.

    Returns the manifest digest (``sha256:...``). The archive is written next to ``out`` and
    renamed into place, so a reader never sees half an archive.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".oci-") as tmp_name:
        tmp = Path(tmp_name)
        blobs = tmp / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        diff_id = _sha256_file(layer_tar)
        layer_gz = tmp / "layer.tar.gz"
        with layer_tar.open("rb") as src, gzip.GzipFile(layer_gz, "wb", compresslevel=1, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        layer_digest = _sha256_file(layer_gz)
        layer_size = layer_gz.stat().st_size
        layer_gz.rename(blobs / layer_digest)

        def put(obj: Any) -> tuple[str, int]:
            data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
            digest = hashlib.sha256(data).hexdigest()
            (blobs / digest).write_bytes(data)
            return digest, len(data)

        config: dict[str, Any] = {
            "Env": [f"{k}={v}" for k, v in {"PATH": DEFAULT_PATH, **(env or {})}.items()]
        }
        if entrypoint is not None:
            config["Entrypoint"] = list(entrypoint)
        if cmd is not None:
            config["Cmd"] = list(cmd)
        if user is not None:
            config["User"] = user
        config_digest, config_size = put(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": CREATED,
                "config": config,
                "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
            }
        )
        manifest_digest, manifest_size = put(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": f"sha256:{config_digest}",
                    "size": config_size,
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": f"sha256:{layer_digest}",
                        "size": layer_size,
                    }
                ],
            }
        )
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": f"sha256:{manifest_digest}",
                    "size": manifest_size,
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name,
                    },
                }
            ],
        }
        (tmp / "index.json").write_text(json.dumps(index))
        (tmp / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w") as tar:
            for entry in ("oci-layout", "index.json", "blobs"):
                tar.add(tmp / entry, arcname=entry, filter=_reset_owner)
        partial.replace(out)
    return f"sha256:{manifest_digest}"


def _reset_owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def _read_json(tar: tarfile.TarFile, member: str) -> Any:
    fh = tar.extractfile(member)
    if fh is None:
        raise ValueError(f"not an OCI archive: no {member}")
    return json.load(io.TextIOWrapper(fh))


def image_config(archive: Path) -> dict[str, Any]:
    """The image configuration of the (first) image in an OCI archive: ``config`` holds ``User``,
    ``Entrypoint``, ``Cmd``, ``Env``...; what a runtime starts a container with."""
    with tarfile.open(archive) as tar:
        index = _read_json(tar, "index.json")
        manifest = _read_json(tar, "blobs/sha256/" + index["manifests"][0]["digest"].removeprefix("sha256:"))
        config: dict[str, Any] = _read_json(
            tar, "blobs/sha256/" + manifest["config"]["digest"].removeprefix("sha256:")
        )
    return config


def image_name(archive: Path) -> str:
    """The image name recorded in an OCI archive's index (for a log line or a check)."""
    with tarfile.open(archive) as tar:
        index = _read_json(tar, "index.json")
    names: list[str] = [
        m.get("annotations", {}).get("org.opencontainers.image.ref.name", "") for m in index["manifests"]
    ]
    return names[0] if names else ""
