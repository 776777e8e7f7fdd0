"""From a solved state to what ``-o`` asked for: output specs, layer blobs, the exporters.

A layer's compressed blob is made once (tar + compress + digest) and remembered in the
store by layer id and compression, so a second export of the same image compresses
nothing; layers of a pulled base image keep their original blobs.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockbuild.engine.store import BlobInfo, Store
from dockbuild.errors import DockbuildError
from dockbuild.progress import Progress

_TYPES = ("docker", "oci", "local", "tar", "image", "registry")
_IMAGE_KEYS = {
    "name",
    "push",
    "push-by-digest",
    "registry.insecure",
    "insecure",
    "oci-mediatypes",
    "compression",
    "compression-level",
    "force-compression",
    "rewrite-timestamp",
    "source-date-epoch",
    "name-canonical",
    "dangling-name-prefix",
    # BuildKit keys that have nothing to do here (no image store, no attestations): accepted.
    "unpack",
    "store",
    "oci-artifact",
    "attestation-inline",
    "prefer-nondist-layers",
    "compatibility-version",
    "buildinfo",
    "buildinfo-attrs",
    "context",
}
_KEYS = {
    "image": _IMAGE_KEYS,
    "registry": _IMAGE_KEYS,
    "docker": _IMAGE_KEYS | {"dest"},
    "oci": _IMAGE_KEYS | {"dest", "tar"},
    "local": {"dest", "platform-split", "mode", "attestation-prefix"},
    "tar": {"dest", "platform-split", "attestation-prefix"},
}
_BOOLS = {
    "push",
    "push-by-digest",
    "registry.insecure",
    "insecure",
    "oci-mediatypes",
    "force-compression",
    "rewrite-timestamp",
    "name-canonical",
    "tar",
    "unpack",
    "store",
    "platform-split",
}
_ANNOTATION = re.compile(
    r"annotation(?:-(manifest|manifest-descriptor|index|index-descriptor))?"
    r"(?:\[([^\]]*)\])?\.(.+)"
)


@dataclass
class OutputSpec:
    type: str
    dest: str | None = None  # None or "-" = stdout (docker, oci, tar)
    attrs: dict[str, str] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    load: bool = False  # docker: `docker load` it rather than writing a file

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.attrs.get(key)
        return default if value is None else _bool(value, key)

    @property
    def push(self) -> bool:
        return self.type in ("image", "registry") and self.flag("push", self.type == "registry")

    @property
    def writes_stdout(self) -> bool:
        return self.type in ("docker", "oci", "tar") and not self.load and self.dest in (None, "-")


def _bool(value: str, key: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("", "true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise DockbuildError(f"invalid output option {key}={value!r}: expected true or false")


@dataclass
class Image:
    state: tuple[str, ...]
    config: dict[str, Any]
    layer_paths: tuple[Path, ...]
    base_layers: int = 0  # how many of the layers come from the base image, unchanged
    epoch: int | None = None  # SOURCE_DATE_EPOCH
    squash: bool = False
    # The registry images the build read (docker-image://REF@DIGEST, see registry_sources):
    # a push to their registry mounts their layers from their repository.
    sources: tuple[str, ...] = ()


@dataclass
class ExportIds:
    image_id: str | None = None  # config digest
    manifest_digest: str | None = None
    descriptor: dict[str, Any] | None = None
    names: list[str] = field(default_factory=list)


def parse_outputs(
    raw: list[str],
    *,
    tags: list[str],
    stdout_is_tty: bool,
    push: bool = False,
    load: bool = False,
) -> list[OutputSpec]:
    """``-o`` values as buildx reads them; none at all means a docker tarball on a pipe.

    ``--push`` is ``-o type=registry`` (or sets push=true on an image output already
    given); ``--load`` is a docker tarball fed to ``docker load``.
    """
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
            attrs[
                key.strip().lower() if not key.strip().startswith("annotation") else key.strip()
            ] = value
        kind = attrs.pop("type", "")
        if kind not in _TYPES:
            raise DockbuildError(
                f"invalid output {text!r}: unknown type {kind!r}",
                hint="use type=docker, oci, image, registry, local or tar",
            )
        for key, value in attrs.items():
            if key.startswith("annotation") and kind in ("image", "registry", "docker", "oci"):
                match = _ANNOTATION.fullmatch(key)
                if not match:
                    raise DockbuildError(f"invalid output {text!r}: bad annotation key {key!r}")
                if match.group(1) in ("index", "index-descriptor"):
                    # BuildKit's image writer refuses them too: one platform, no index.
                    raise DockbuildError(
                        f"invalid output {text!r}: {key}: "
                        "index annotations not supported for single platform export",
                        hint="annotate the manifest (annotation.K=V) or its descriptor in "
                        "index.json (annotation-manifest-descriptor.K=V)",
                    )
                continue
            if key not in _KEYS[kind]:
                raise DockbuildError(
                    f"invalid output {text!r}: type={kind} has no option {key!r}",
                    hint="options: " + ", ".join(sorted(_KEYS[kind])),
                )
            if key in _BOOLS:
                _bool(value, key)
        dest = attrs.pop("dest", None)
        if kind == "local" and not dest:
            raise DockbuildError("type=local needs dest=DIRECTORY")
        names = [n.strip() for n in attrs.pop("name", "").split(",") if n.strip()]
        spec = OutputSpec(kind, dest, attrs, names or list(tags))
        _check_image_spec(spec)
        specs.append(spec)
    if push:
        image_specs = [s for s in specs if s.type in ("image", "registry")]
        if image_specs:
            for s in image_specs:
                s.attrs["push"] = "true"
        else:
            specs.append(OutputSpec("registry", names=list(tags)))
        if not tags and not any(s.names for s in specs if s.push):
            raise DockbuildError("--push needs an image name", hint="add -t NAME")
    if load:
        specs.append(OutputSpec("docker", names=list(tags), load=True))
    if not raw and not push and not load and not stdout_is_tty:
        specs.append(OutputSpec("docker", "-", names=list(tags)))
    for s in specs:
        if s.push and not s.names:
            raise DockbuildError(
                f"type={s.type},push=true needs an image name", hint="add -t NAME or name=NAME"
            )
    to_stdout = [s for s in specs if s.writes_stdout]
    if len(to_stdout) > 1:
        raise DockbuildError("only one output can write to stdout")
    if to_stdout and stdout_is_tty:
        raise DockbuildError(
            f"refusing to write a {to_stdout[0].type} archive to a terminal",
            hint="redirect stdout or give dest=FILE",
        )
    return specs


def _check_image_spec(spec: OutputSpec) -> None:
    """Refuse bad values now, before the build runs."""
    from dockbuild.outputs.compression import check_level
    from dockbuild.outputs.image import normalize_name

    if spec.type in ("local", "tar"):
        return
    compression = spec.attrs.get("compression", "gzip")
    if compression == "estargz":
        raise DockbuildError(
            "compression=estargz is not supported: dockbuild does not write eStargz "
            "(lazy-pulling) layers",
            hint="use gzip, zstd or uncompressed",
        )
    if compression not in ("gzip", "zstd", "uncompressed"):
        raise DockbuildError(
            f"unsupported compression {compression!r}", hint="use gzip, zstd or uncompressed"
        )
    level = spec.attrs.get("compression-level")
    if level is not None:
        if not level.strip().lstrip("-").isdigit():
            raise DockbuildError(f"invalid compression-level={level!r}: expected a number")
        try:
            check_level(compression, int(level))
        except ValueError as e:
            raise DockbuildError(str(e)) from None
    epoch = spec.attrs.get("source-date-epoch")
    if epoch is not None and not epoch.isdigit():
        raise DockbuildError(f"invalid source-date-epoch={epoch!r}: expected seconds since 1970")
    for name in spec.names:
        try:
            normalize_name(name)
        except ValueError as e:
            raise DockbuildError(str(e)) from None
    if spec.attrs.get("compression") == "zstd" and not spec.flag("oci-mediatypes", True):
        raise DockbuildError(
            "compression=zstd needs OCI media types", hint="drop oci-mediatypes=false"
        )


def _split_csv(text: str) -> list[str]:
    import csv

    return next(csv.reader([text]))


def registry_sources(root: Any) -> tuple[str, ...]:
    """The identifiers of the registry images an LLB graph reads (its docker-image sources)."""
    from dockbuild import llb

    return tuple(
        dict.fromkeys(
            op.identifier
            for op in llb.walk(root)
            if isinstance(op, llb.SourceOp) and op.identifier.startswith("docker-image://")
        )
    )


def finish_config(config: dict[str, Any], history_ops: list, solver: Any) -> dict[str, Any]:
    """Mark the history entries of steps that changed nothing as empty layers."""
    config = json.loads(json.dumps(config))
    for entry, op in zip(config.get("history", []), history_ops, strict=True):
        if op is not None and not solver.added_layer(op):
            entry["empty_layer"] = True
    return config


def base_layer_count(config: dict[str, Any], history_ops: list, layers: int) -> int:
    """How many layers of the result are the base image's: its non-empty history entries."""
    count = sum(
        1
        for entry, op in zip(config.get("history", []), history_ops, strict=False)
        if op is None and not entry.get("empty_layer")
    )
    return min(count, layers)


def source_date_epoch(build_args: dict[str, str | None]) -> int | None:
    """SOURCE_DATE_EPOCH from ``--build-arg`` (a bare name reads the environment), else env."""
    value: str | None
    if "SOURCE_DATE_EPOCH" in build_args:
        value = build_args["SOURCE_DATE_EPOCH"]
        if value is None:
            value = os.environ.get("SOURCE_DATE_EPOCH")
    else:
        value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    if not value.strip().isdigit():
        raise DockbuildError(
            f"invalid SOURCE_DATE_EPOCH {value!r}: expected seconds since 1970 (an integer)"
        )
    return int(value.strip())


def _timestamp(epoch: int | None) -> str:
    when = (
        datetime.datetime.fromtimestamp(epoch, datetime.UTC)
        if epoch is not None
        else datetime.datetime.now(datetime.UTC)
    )
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")


@dataclass(frozen=True)
class LayerOptions:
    """How layer blobs are made: the ``compression*`` and ``rewrite-timestamp`` options."""

    compression: str = "gzip"
    level: int | None = None
    force: bool = False
    clamp: int | None = None  # rewrite-timestamp: clamp file times of new layers to this

    def key(self, *, clamp: bool, squash: int | None = None) -> str:
        """The store's name for a blob variant; the plain kind for the default one."""
        parts = [self.compression]
        if self.level is not None:
            parts.append(f"level={self.level}")
        if clamp and self.clamp is not None:
            parts.append(f"clamp={self.clamp}")
        if squash is not None:
            parts.append(f"squash={squash}")
        return ";".join(parts)


@dataclass(frozen=True)
class _Blob:
    kind: str  # gzip | zstd | uncompressed
    digest: str
    size: int
    diff_id: str


def _lookup(store: Store, layer_id: str, key: str) -> _Blob | None:
    """A cached blob variant: plain kinds directly, others through a small metadata blob."""
    if ";" not in key:
        info = store.layer_blob(layer_id, key)
        diff_id = store.layer_diff_id(layer_id)
        if info is None or diff_id is None:
            return None
        return _Blob(key, info.digest, info.size, diff_id)
    row = store.layer_blob(layer_id, key)
    if row is None:
        return None
    try:
        meta = json.loads(store.blob_path(row.digest).read_bytes())
        blob = _Blob(meta["kind"], meta["digest"], int(meta["size"]), meta["diff_id"])
    except (OSError, ValueError, KeyError):
        return None
    return blob if store.has_blob(blob.digest) else None


def _remember(store: Store, layer_id: str, key: str, blob: _Blob) -> None:
    if ";" not in key:
        store.set_layer_diff_id(layer_id, blob.diff_id)
        store.set_layer_blob(BlobInfo(layer_id, key, blob.digest, blob.size))
        return
    meta = json.dumps(
        {"kind": blob.kind, "digest": blob.digest, "size": blob.size, "diff_id": blob.diff_id},
        sort_keys=True,
    ).encode()
    digest = store.put_blob_bytes(meta)
    # The blob itself gets a row too, so whatever walks layer_blobs (GC) sees it in use.
    store.set_layer_blob(BlobInfo(layer_id, key + ";blob", blob.digest, blob.size))
    store.set_layer_blob(BlobInfo(layer_id, key, digest, len(meta)))


def _make_blob(
    store: Store, kind: str, level: int | None, write_tar: Any, source: Path | None = None
) -> _Blob:
    """Compress a layer tar (written by ``write_tar(file)``, or read from the blob
    ``source``) into the blob store in one pass; return the blob and its diff_id.

    The tar is hashed (diff_id) on its way into the compressor and the blob (digest) on
    its way out, so the blob is never read back."""
    from dockbuild.engine import archive
    from dockbuild.outputs.compression import HashingWriter, open_compressor

    work = store.tempdir("e")
    blob_path = work / "blob"
    with open(blob_path, "wb") as dst:
        blob = HashingWriter(dst)  # type: ignore[arg-type]
        writer = open_compressor(blob, kind, level)  # type: ignore[arg-type]
        tee = HashingWriter(writer)
        try:
            if source is not None:
                with archive.open_blob(source) as src:
                    while chunk := src.read(1 << 20):
                        tee.write(chunk)
            else:
                write_tar(tee)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        dst.flush()
        os.fsync(dst.fileno())
    digest, size = store.put_blob_file(blob_path, "sha256:" + blob.sha.hexdigest())
    with contextlib.suppress(OSError):
        work.rmdir()
    return _Blob(kind, digest, size, "sha256:" + tee.sha.hexdigest())


def layer_blobs(
    store: Store, image: Image, options: LayerOptions | str, progress: Progress
) -> list[_Blob]:
    """One compressed blob per layer, made (and remembered) where missing.

    Base-image layers keep the blob they came with unless ``force-compression``;
    ``rewrite-timestamp`` clamps the file times of the build's own layers only.
    """
    from dockbuild.engine import archive

    if isinstance(options, str):
        options = LayerOptions(options)
    out: list[_Blob] = []
    vertex = None
    layer_ids = list(image.state)
    paths = list(image.layer_paths)
    squash_from = None
    if image.squash and len(layer_ids) - image.base_layers > 1:
        squash_from = image.base_layers
    for index, (layer_id, path) in enumerate(zip(layer_ids, paths, strict=True)):
        if squash_from is not None and index >= squash_from:
            break
        base = index < image.base_layers
        if base and not options.force:
            found = next(
                (
                    b
                    for kind in dict.fromkeys((options.compression, "gzip", "zstd", "uncompressed"))
                    if (b := _lookup(store, layer_id, kind))
                ),
                None,
            )
            if found is not None:
                out.append(found)
                continue
        key = options.key(clamp=not base)
        blob = _lookup(store, layer_id, key)
        if blob is None:
            if vertex is None:
                vertex = progress.vertex("exporting layers")
            # A base layer's tar cannot be made again byte for byte from its files: its
            # blob is recompressed so its diff_id stays. Our own layers' tars are
            # deterministic, and writing them again is faster than decompressing.
            existing = (
                next(
                    (
                        b
                        for kind in ("gzip", "zstd", "uncompressed")
                        if (b := _lookup(store, layer_id, kind))
                    ),
                    None,
                )
                if base
                else None
            )
            clamp = None if base else options.clamp
            if existing is not None:
                blob = _make_blob(
                    store,
                    options.compression,
                    options.level,
                    None,
                    source=store.blob_path(existing.digest),
                )
            else:
                store.unpacked_paths([layer_id])  # a packed layer (a cache import's) gets its files
                blob = _make_blob(
                    store,
                    options.compression,
                    options.level,
                    lambda f, p=path, c=clamp: archive.write_layer_tar(p, f, clamp_mtime=c),
                )
            _remember(store, layer_id, key, blob)
        out.append(blob)
    if squash_from is not None:
        top = layer_ids[-1]
        key = options.key(clamp=True, squash=squash_from)
        blob = _lookup(store, top, key)
        if blob is None:
            if vertex is None:
                vertex = progress.vertex("exporting layers")
            from dockbuild.outputs.squash import write_squashed_tar

            upper = store.unpacked_paths(layer_ids[squash_from:])
            blob = _make_blob(
                store,
                options.compression,
                options.level,
                lambda f: write_squashed_tar(upper, f, store, clamp_mtime=options.clamp),
            )
            _remember(store, top, key, blob)
        out.append(blob)
    if vertex is not None:
        vertex.done()
    return out


def squash_history(config: dict[str, Any], base_layers: int) -> None:
    """With one layer for all the build added, only its last non-empty entry keeps one."""
    seen = 0
    entries = config.get("history", [])
    own = []
    for entry in entries:
        if entry.get("empty_layer"):
            continue
        seen += 1
        if seen > base_layers:
            own.append(entry)
    for entry in own[:-1]:
        entry["empty_layer"] = True


def _annotations(spec: OutputSpec, platform: str) -> dict[str, dict[str, str]]:
    """``annotation.*`` and ``annotation-<type>[platform].*`` keys, by where they go
    (``index*`` ones were refused by :func:`parse_outputs`)."""
    out: dict[str, dict[str, str]] = {"manifest": {}, "manifest-descriptor": {}}
    for key, value in spec.attrs.items():
        match = _ANNOTATION.fullmatch(key)
        if not match:
            continue
        where, plat, name = match.group(1) or "manifest", match.group(2), match.group(3)
        if plat and plat != platform:
            continue  # for a platform this build does not make
        out[where][name] = value
    return out


def image_blobs(
    store: Store, image: Image, spec: OutputSpec, progress: Progress, now: str | None = None
) -> Any:
    from dockbuild.outputs.image import build_image, platform_of

    level = spec.attrs.get("compression-level")
    epoch = image.epoch
    if spec.attrs.get("source-date-epoch"):
        epoch = int(spec.attrs["source-date-epoch"])
    options = LayerOptions(
        compression=spec.attrs.get("compression", "gzip"),
        level=int(level) if level is not None else None,
        force=spec.flag("force-compression"),
        clamp=epoch if spec.flag("rewrite-timestamp") and epoch is not None else None,
    )
    oci = spec.flag("oci-mediatypes", True)
    layers = layer_blobs(store, image, options, progress)
    config = json.loads(json.dumps(image.config))
    created = _timestamp(epoch) if epoch is not None or now is None else now
    config["created"] = created
    for entry in config.get("history", []):
        entry.setdefault("created", created)
    if image.squash:
        squash_history(config, image.base_layers)
    config["rootfs"] = {"type": "layers", "diff_ids": [b.diff_id for b in layers]}
    from dockbuild.outputs.compression import layer_media_type
    from dockbuild.outputs.image import Descriptor, LayerBlob

    blobs = [
        LayerBlob(
            Descriptor(layer_media_type(b.kind, True), b.digest, b.size), store.blob_path(b.digest)
        )
        for b in layers
    ]
    plat = platform_of(config)
    platform = "/".join(str(plat[k]) for k in ("os", "architecture", "variant") if plat.get(k))
    notes = _annotations(spec, platform)
    return build_image(config, blobs, oci_mediatypes=oci, annotations=notes["manifest"]), notes


def export_all(
    store: Store, image: Image, specs: list[OutputSpec], progress: Progress
) -> ExportIds:
    """Write every output; a failed write is an error naming the destination."""
    try:
        return _export_all(store, image, specs, progress)
    except BrokenPipeError:
        raise  # the CLI ends quietly when stdout's reader went away
    except OSError as e:
        where = e.filename or next((s.dest for s in specs if s.dest not in (None, "-")), "output")
        raise DockbuildError(
            f"exporting to {where}: {(e.strerror or str(e)).lower()}",
            hint="the destination was left as it was",
        ) from e


def _export_all(
    store: Store, image: Image, specs: list[OutputSpec], progress: Progress
) -> ExportIds:
    ids = ExportIds()
    pusher = None
    now = _timestamp(None)  # one time for every output of the build: the same image
    try:
        for spec in specs:
            if spec.type in ("docker", "oci", "image", "registry"):
                blobs, notes = image_blobs(store, image, spec, progress, now)
                names = _names(spec, blobs.manifest_digest)
                ids.image_id = blobs.config_digest
                ids.manifest_digest = blobs.manifest_digest
                ids.descriptor = blobs.manifest_descriptor(notes["manifest-descriptor"]).to_json()
                ids.names = names
                if spec.type in ("docker", "oci"):
                    _export_image(spec, blobs, progress, names, notes)
                elif spec.push:
                    origins = _layer_origins(store, image.sources)
                    pusher = _push(spec, blobs, names, progress, pusher, origins)
                else:
                    progress.message(_NOT_STORED)
            elif spec.type == "local":
                from dockbuild.outputs.local import export_local

                vertex = progress.vertex(f"exporting to client directory {spec.dest}")
                export_local(store.unpacked_paths(image.state), Path(spec.dest or "."))
                vertex.done()
            elif spec.type == "tar":
                from dockbuild.outputs.tar import export_tar

                vertex = progress.vertex("exporting to client tarball")
                export_tar(store.unpacked_paths(image.state), **_destination(spec))
                vertex.done()
    finally:
        if pusher is not None:
            pusher.client.close()
    return ids


# BuildKit's daemon keeps a type=image result in its image store; dockbuild has none.
_NOT_STORED = (
    "WARNING: -o type=image without push=true keeps the image nowhere: dockbuild has no "
    "image store (its digests are still reported). Use --push, --load, or "
    "-o type=oci,dest=FILE (or type=docker)"
)


def _names(spec: OutputSpec, manifest_digest: str) -> list[str]:
    """The image's names: ``name=``/``-t``, plus ``name@digest`` with name-canonical;
    without names, ``dangling-name-prefix@digest``."""
    from dockbuild.outputs.image import normalize_name

    names = [normalize_name(n) for n in spec.names]
    if not names and spec.attrs.get("dangling-name-prefix"):
        names = [f"{spec.attrs['dangling-name-prefix']}@{manifest_digest}"]
    if spec.flag("name-canonical"):
        names += [f"{_repository(n)}@{manifest_digest}" for n in names if "@" not in n]
    return names


def _repository(name: str) -> str:
    """``domain/path`` of a full name, without tag or digest."""
    name = name.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def _layer_origins(store: Store, sources: tuple[str, ...]) -> list[tuple[str, Any]]:
    """(layer digest, the repository it was pulled from) for each registry image read:
    BuildKit's distribution-source labels, taken from the pinned manifests in the cache."""
    from dockbuild.engine.registry.reference import parse_reference

    origins = []
    for identifier in sources:
        location, _, manifest_digest = identifier.removeprefix("docker-image://").rpartition("@")
        try:
            ref = parse_reference(location)
            manifest = json.loads(store.blob_path(manifest_digest).read_bytes())
        except (OSError, ValueError):
            continue  # not in the cache (nothing of it was pulled): nothing to mount
        origins += [(layer["digest"], ref) for layer in manifest.get("layers", [])]
    return origins


def _push(
    spec: OutputSpec,
    blobs: Any,
    names: list[str],
    progress: Progress,
    pusher: Any,
    origins: list[tuple[str, Any]],
) -> Any:
    """Push to every repository named (tags, or by digest), sharing one pusher per build
    so a second repository mounts the blobs the first one received; a layer of an image
    the build pulled from the same registry is mounted from the repository it came from."""
    from dockbuild.engine.registry.client import RegistryClient
    from dockbuild.engine.registry.push import PushBlob, Pusher
    from dockbuild.engine.registry.reference import Reference, parse_reference

    refs = [parse_reference(n) for n in names if "@" not in n]
    insecure = spec.flag("registry.insecure") or spec.flag("insecure")
    if pusher is None or insecure:
        known = pusher.known if pusher is not None else {}
        if pusher is not None:
            pusher.client.close()
        client = RegistryClient(insecure={r.domain for r in refs} if insecure else set())
        pusher = Pusher(client)
        pusher.known.update(known)
    for digest, origin in origins:
        pusher.remember(digest, origin)
    by_digest = spec.flag("push-by-digest")
    items = [PushBlob(d.digest, d.size, path=blobs.blobs[d.digest]) for d in blobs.layers]
    items.append(PushBlob(blobs.config_digest, len(blobs.config), data=blobs.config))
    repos: dict[tuple[str, str], list[str]] = {}
    for ref in refs:
        tags = repos.setdefault((ref.domain, ref.path), [])
        if ref.tag and not by_digest:
            tags.append(ref.tag)
    for (domain, path), tags in repos.items():
        ref = Reference(domain, path)
        vertex = progress.vertex(f"pushing {ref.repository}")
        pusher.log = lambda text, v=vertex: v.log("stdout", text.encode())
        try:
            pusher.push(ref, items, blobs.manifest, blobs.manifest_doc["mediaType"], tags=tags)
        except BaseException as e:
            vertex.error(str(e))
            raise
        vertex.done()
    return pusher


def _export_image(
    spec: OutputSpec,
    blobs: Any,
    progress: Progress,
    names: list[str],
    notes: dict[str, dict[str, str]],
) -> None:
    created = blobs.config_doc.get("created")
    what = "docker image (docker load)" if spec.load else f"{spec.type} image format"
    vertex = progress.vertex(f"exporting to {what}")
    vertex.log("stdout", f"exporting manifest {blobs.manifest_digest} done\n".encode())
    vertex.log("stdout", f"exporting config {blobs.config_digest} done\n".encode())
    names = [n for n in names if "@" not in n] if spec.type == "docker" else names
    layout = {"descriptor_annotations": notes["manifest-descriptor"]}
    if spec.type == "docker":
        from dockbuild.outputs.docker import export_docker, load_into_docker

        if spec.load:
            load_into_docker(blobs, names=names, created=created, **layout)
            vertex.log("stdout", b"loading image to docker done\n")
        else:
            export_docker(blobs, names=names, created=created, **layout, **_destination(spec))
    else:
        from dockbuild.outputs.oci import export_oci

        if not spec.flag("tar", True):
            if not spec.dest or spec.dest == "-":
                raise DockbuildError("type=oci,tar=false needs dest=DIRECTORY")
            export_oci(
                blobs, names=names, created=created, dest=Path(spec.dest), tar=False, **layout
            )
        else:
            export_oci(blobs, names=names, created=created, **layout, **_destination(spec))
    if not spec.load:
        vertex.log("stdout", b"sending tarball done\n")
    vertex.done()


def _destination(spec: OutputSpec) -> dict[str, Any]:
    """stdout, or a file the exporter writes atomically (no partial file on failure)."""
    if spec.dest in (None, "-"):
        return {"out": sys.stdout.buffer}
    return {"dest": Path(spec.dest)}


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``--iidfile`` / ``--metadata-file`` (see :func:`dockbuild.atomic.output_file`)."""
    from dockbuild.atomic import output_file

    try:
        with output_file(path) as f:
            f.write(data)
    except OSError as e:
        raise DockbuildError(
            f"writing {e.filename or path}: {(e.strerror or str(e)).lower()}",
            hint="the file was left as it was",
        ) from e


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
