"""From a solved state to what ``-o`` asked for: output specs, layer blobs, the exporters.

A layer's compressed blob is made once (tar + compress + digest) and remembered in the
store by layer id and compression, so a second export of the same image compresses
nothing; layers of a pulled base image keep their original blobs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockbuild.engine.store import BlobInfo, Store
from dockbuild.errors import DockbuildError
from dockbuild.progress import Progress

_TYPES = ("docker", "oci", "local", "tar", "image")


@dataclass
class OutputSpec:
    type: str
    dest: str | None = None  # None or "-" = stdout (docker, oci, tar)
    attrs: dict[str, str] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)


@dataclass
class Image:
    state: tuple[str, ...]
    config: dict[str, Any]
    layer_paths: tuple[Path, ...]


@dataclass
class ExportIds:
    image_id: str | None = None  # config digest
    manifest_digest: str | None = None
    descriptor: dict[str, Any] | None = None
    names: list[str] = field(default_factory=list)


def parse_outputs(raw: list[str], *, tags: list[str], stdout_is_tty: bool) -> list[OutputSpec]:
    """``-o`` values as buildx reads them; none at all means a docker tarball on a pipe."""
    specs = []
    for text in raw:
        if text == "-":
            specs.append(OutputSpec("tar", "-"))
            continue
        if "=" not in text:
            specs.append(OutputSpec("local", text))
            continue
        attrs: dict[str, str] = {}
        for field_ in _split_csv(text):
            key, sep, value = field_.partition("=")
            if not sep:
                raise DockbuildError(f"invalid output {text!r}: {field_!r} is not KEY=VALUE")
            attrs[key.strip().lower()] = value
        kind = attrs.pop("type", "")
        if kind not in _TYPES:
            raise DockbuildError(
                f"invalid output {text!r}: unknown type {kind!r}",
                hint="use type=docker, oci, local or tar",
            )
        if kind == "image":
            raise DockbuildError(
                "type=image (push) is not supported yet", hint="use type=docker or type=oci"
            )
        dest = attrs.pop("dest", None)
        if kind == "local" and not dest:
            raise DockbuildError("type=local needs dest=DIRECTORY")
        names = [n for n in attrs.pop("name", "").split(",") if n] if "name" in attrs else []
        specs.append(OutputSpec(kind, dest, attrs, names or list(tags)))
    if not raw and not stdout_is_tty:
        specs.append(OutputSpec("docker", "-", names=list(tags)))
    to_stdout = [s for s in specs if s.type != "local" and s.dest in (None, "-")]
    if len(to_stdout) > 1:
        raise DockbuildError("only one output can write to stdout")
    if to_stdout and stdout_is_tty:
        raise DockbuildError(
            f"refusing to write a {to_stdout[0].type} archive to a terminal",
            hint="redirect stdout or give dest=FILE",
        )
    return specs


def _split_csv(text: str) -> list[str]:
    import csv

    return next(csv.reader([text]))


def finish_config(config: dict[str, Any], history_ops: list, solver: Any) -> dict[str, Any]:
    """Mark the history entries of steps that changed nothing as empty layers."""
    config = json.loads(json.dumps(config))
    for entry, op in zip(config.get("history", []), history_ops, strict=True):
        if op is not None and not solver.added_layer(op):
            entry["empty_layer"] = True
    return config


def _now() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
        if epoch and epoch.isdigit()
        else datetime.datetime.now(datetime.UTC)
    )
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")


def layer_blobs(store: Store, image: Image, compression: str, progress: Progress) -> list[Any]:
    """One compressed blob per layer, made (and remembered) where missing."""
    from dockbuild.engine import archive
    from dockbuild.outputs.compression import compress_stream, layer_media_type
    from dockbuild.outputs.image import Descriptor, LayerBlob

    out = []
    vertex = None
    for layer_id, path in zip(image.state, image.layer_paths, strict=True):
        info = store.layer_blob(layer_id, compression)
        diff_id = store.layer_diff_id(layer_id)
        if info is None or diff_id is None:
            if vertex is None:
                vertex = progress.vertex("exporting layers")
            work = store.tempdir("e")
            blob_path = work / "blob"
            existing = next(
                (
                    b
                    for kind in ("gzip", "zstd", "uncompressed")
                    if (b := store.layer_blob(layer_id, kind))
                ),
                None,
            )
            if existing is not None and diff_id is not None:
                # Recompress the original blob: its diff_id must not change.
                with (
                    archive.open_blob(store.blob_path(existing.digest)) as src,
                    open(blob_path, "wb") as dst,
                ):
                    compress_stream(src, dst, compression)
                    dst.flush()
                    os.fsync(dst.fileno())
            else:
                tar_path = work / "layer.tar"
                with open(tar_path, "wb") as f:
                    archive.write_layer_tar(path, f)
                diff_id = "sha256:" + _sha256_file(tar_path)
                with open(tar_path, "rb") as src, open(blob_path, "wb") as dst:
                    compress_stream(src, dst, compression)
                    dst.flush()
                    os.fsync(dst.fileno())
                tar_path.unlink()
                store.set_layer_diff_id(layer_id, diff_id)
            digest, size = store.put_blob_file(blob_path)
            info = BlobInfo(layer_id, compression, digest, size)
            store.set_layer_blob(info)
        desc = Descriptor(layer_media_type(compression, True), info.digest, info.size)
        out.append((LayerBlob(desc, store.blob_path(info.digest)), diff_id))
    if vertex is not None:
        vertex.done()
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_blobs(store: Store, image: Image, spec: OutputSpec, progress: Progress) -> Any:
    from dockbuild.outputs.image import build_image

    compression = spec.attrs.get("compression", "gzip")
    if compression not in ("gzip", "zstd", "uncompressed"):
        raise DockbuildError(f"unsupported compression {compression!r}")
    oci = spec.attrs.get("oci-mediatypes", "true").lower() != "false"
    layers = layer_blobs(store, image, compression, progress)
    config = json.loads(json.dumps(image.config))
    created = _now()
    config["created"] = created
    for entry in config.get("history", []):
        entry.setdefault("created", created)
    config["rootfs"] = {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]}
    return build_image(config, [blob for blob, _ in layers], oci_mediatypes=oci)


def export_all(store: Store, image: Image, specs: list[OutputSpec], progress: Progress) -> ExportIds:
    ids = ExportIds()
    for spec in specs:
        if spec.type in ("docker", "oci"):
            blobs = image_blobs(store, image, spec, progress)
            ids.image_id = blobs.config_digest
            ids.manifest_digest = blobs.manifest_digest
            ids.descriptor = blobs.manifest_descriptor().to_json()
            ids.names = list(spec.names)
            _export_image(spec, blobs, progress)
        elif spec.type == "local":
            from dockbuild.outputs.local import export_local

            vertex = progress.vertex(f"exporting to client directory {spec.dest}")
            export_local(image.layer_paths, Path(spec.dest or "."))
            vertex.done()
        elif spec.type == "tar":
            from dockbuild.outputs.tar import export_tar

            vertex = progress.vertex("exporting to client tarball")
            export_tar(image.layer_paths, **_destination(spec))
            vertex.done()
    return ids


def _export_image(spec: OutputSpec, blobs: Any, progress: Progress) -> None:
    created = blobs.config_doc.get("created")
    vertex = progress.vertex(f"exporting to {spec.type} image format")
    vertex.log("stdout", f"exporting manifest {blobs.manifest_digest} done\n".encode())
    vertex.log("stdout", f"exporting config {blobs.config_digest} done\n".encode())
    if spec.type == "docker":
        from dockbuild.outputs.docker import export_docker

        export_docker(blobs, names=spec.names, created=created, **_destination(spec))
    else:
        from dockbuild.outputs.oci import export_oci

        if spec.attrs.get("tar", "true").lower() == "false":
            if not spec.dest or spec.dest == "-":
                raise DockbuildError("type=oci,tar=false needs dest=DIRECTORY")
            export_oci(blobs, names=spec.names, created=created, dest=Path(spec.dest), tar=False)
        else:
            export_oci(blobs, names=spec.names, created=created, **_destination(spec))
    vertex.log("stdout", b"sending tarball done\n")
    vertex.done()


def _destination(spec: OutputSpec) -> dict[str, Any]:
    """stdout, or a file the exporter writes atomically (no partial file on failure)."""
    if spec.dest in (None, "-"):
        return {"out": sys.stdout.buffer}
    return {"dest": Path(spec.dest)}


def write_atomic(path: Path, data: bytes) -> None:
    from dockbuild.outputs.atomic import atomic_file

    with atomic_file(path) as f:
        f.write(data)


def write_metadata(path: Path, ids: ExportIds) -> None:
    meta: dict[str, Any] = {}
    if ids.image_id:
        meta["containerimage.config.digest"] = ids.image_id
    if ids.manifest_digest:
        meta["containerimage.digest"] = ids.manifest_digest
    if ids.descriptor:
        meta["containerimage.descriptor"] = ids.descriptor
    if ids.names:
        meta["image.name"] = ",".join(ids.names)
    write_atomic(path, json.dumps(meta, indent=2).encode() + b"\n")
