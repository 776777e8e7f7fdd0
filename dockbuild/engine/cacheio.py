"""Cache export and import: ``--cache-to`` / ``--cache-from`` (type=local and registry).

A cache export is an OCI image manifest whose layers are the layer blobs of the exported
steps and whose config (media type :data:`CONFIG_MEDIA_TYPE`) lists the records: each
step's cache key, its layer chain, its description, type and creation time, and each
layer's creation time (the history ``created`` of its step, so an import gives the same
image digest; a cache without the times still imports; an inline cache reads them from
the image's history). ``type=local`` writes it into an OCI layout directory
(``index.json`` entry named by ``tag``); ``type=registry`` pushes it under ``ref``. Keys
are content-addressed (op definitions, base image manifest digests, context file
contents), so they mean the same on every machine.

Import is lazy in BuildKit's spirit: the manifests are read while the frontend works;
before solving, the graph is walked from the result down, and only the records the build
can use (the highest hit on every path) are brought in, with just the layer blobs they
need, verified against their digests. Layers stay packed: a build whose steps all hit
the cache and exports an image never unpacks them; a step that must run on top of them,
or a local/tar export, unpacks them then (and checks their diff_ids).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockbuild import llb
from dockbuild.engine.store import BlobInfo, Store, remove_tree, unpack_verified
from dockbuild.errors import DockbuildError
from dockbuild.progress import Progress

CONFIG_MEDIA_TYPE = "application/vnd.dockbuild.cache.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
_CACHE_KEY = "dockbuild.cache.v1"
_INLINE_KEY = "dockbuild.cache.inline.v1"  # in an image config (type=inline)
_TYPES = ("local", "registry", "inline")
_KNOWN = {
    "local": {"dest", "src", "tag", "digest", "mode", "compression", "compression-level",
              "force-compression", "ignore-error", "image-manifest", "oci-mediatypes", "reset",
              "cache-mounts"},
    "registry": {"ref", "mode", "compression", "compression-level", "force-compression",
                 "ignore-error", "image-manifest", "oci-mediatypes", "cache-mounts"},
    "inline": set(),
}  # fmt: skip


@dataclass
class CacheSpec:
    type: str
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def ignore_error(self) -> bool:
        return self.attrs.get("ignore-error", "false").lower() == "true"

    @property
    def mode(self) -> str:
        return self.attrs.get("mode", "min")

    def describe(self) -> str:
        where = self.attrs.get("dest") or self.attrs.get("src") or self.attrs.get("ref") or ""
        return f"type={self.type}" + (f" {where}" if where else "")


def parse_cache_spec(text: str, *, export: bool) -> CacheSpec:
    """``type=local,dest=DIR``, ``type=registry,ref=REF``, or a bare ``REF`` (registry)."""
    import csv

    flag = "--cache-to" if export else "--cache-from"
    if "=" not in text:
        return CacheSpec("registry", {"ref": text})
    attrs: dict[str, str] = {}
    for item in next(csv.reader([text])):
        key, sep, value = item.partition("=")
        if not sep:
            raise DockbuildError(f"invalid {flag} {text!r}: {item!r} is not KEY=VALUE")
        attrs[key.strip().lower()] = value
    kind = attrs.pop("type", "")
    if kind not in _TYPES:
        raise DockbuildError(
            f"invalid {flag} {text!r}: cache type {kind!r} is not supported",
            hint="use type=local, type=registry or type=inline",
        )
    unknown = set(attrs) - _KNOWN[kind]
    if unknown:
        raise DockbuildError(f"invalid {flag} {text!r}: unknown key(s) {', '.join(sorted(unknown))}")
    if kind == "inline" and not export:
        raise DockbuildError(
            f"invalid {flag} {text!r}: an inline cache is read with type=registry,ref=IMAGE"
        )
    if attrs.get("mode", "min") not in ("min", "max"):
        raise DockbuildError(f"invalid {flag} {text!r}: mode must be min or max")
    if attrs.get("compression", "gzip") not in ("gzip", "zstd", "uncompressed"):
        raise DockbuildError(f"invalid {flag} {text!r}: compression must be gzip, zstd or uncompressed")
    if kind == "local" and not attrs.get("dest" if export else "src"):
        raise DockbuildError(f"{flag} type=local needs {'dest' if export else 'src'}=DIRECTORY")
    if kind == "registry" and not attrs.get("ref"):
        raise DockbuildError(f"{flag} type=registry needs ref=REFERENCE")
    return CacheSpec(kind, attrs)


# -- export ---------------------------------------------------------------------------------


def _chain_ops(root: llb.Op | None) -> list[llb.Op]:
    """The ops whose results the final image is built from, one after the other (min)."""
    out: list[llb.Op] = []
    op = root
    while op is not None:
        out.append(op)
        if isinstance(op, llb.ExecOp):
            op = op.rootfs
        elif isinstance(op, llb.FileOp):
            op = op.base
        elif isinstance(op, llb.MergeOp):
            out.extend(o for o in llb.walk(op) if o is not op)
            break
        else:
            break
    return out


def export_cache(
    store: Store, solver: Any, roots: list[llb.Op | None], specs: list[CacheSpec], progress: Progress
) -> None:
    """Write each --cache-to: one cache manifest holding the records of every root (one
    per platform of a multi-platform build, as BuildKit exports all platforms' cache)."""
    for spec in specs:
        if spec.type == "inline":
            continue  # in the image config already (inline_metadata)
        vertex = progress.vertex(f"exporting cache to {spec.describe()}")
        try:
            _export_one(store, solver, roots, spec, vertex)
        except (DockbuildError, OSError) as e:
            message = e.message if isinstance(e, DockbuildError) else str(e)
            if spec.ignore_error:
                vertex.log("stderr", f"ignored: {message}\n".encode())
                vertex.done()
                continue
            vertex.error(message)
            raise DockbuildError(f"cache export to {spec.describe()} failed: {message}") from e
        vertex.done()


def _export_one(
    store: Store, solver: Any, roots: list[llb.Op | None], spec: CacheSpec, vertex: Any
) -> None:
    ops = [op for root in roots for op in (llb.walk(root) if spec.mode == "max" else _chain_ops(root))]
    compression = spec.attrs.get("compression", "gzip")
    records = []
    layers: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()  # a step the platforms share (a $BUILDPLATFORM stage) once
    for op in ops:
        if isinstance(op, llb.SourceOp) and op.identifier.startswith("local://"):
            continue
        key = solver.solved_key(op)
        if key in seen:
            continue
        seen.add(key)
        record = store.record(key)
        if record is None or not all(store.has_layer(lid) for lid in record.layers):
            continue
        for lid in record.layers:
            if lid not in layers:
                layers[lid] = _layer_blob(store, lid, compression)
                # When the layer was made: the history time of its step, so a build
                # from the imported cache gives the exporter's image digest.
                made = store.layer_created(lid)
                if made is not None:
                    layers[lid]["created"] = made
        inputs = record.inputs
        if inputs and any(len(f.get("entries", {})) > 2000 for f in inputs.get("files", [])):
            inputs = {**inputs, "files": []}  # keep the cache manifest small
        records.append(
            {
                "key": record.key,
                "layers": record.layers,
                "description": record.description,
                "type": record.type,
                "owns": record.owns,
                "refs": record.refs,
                "inputs": inputs,
                "created": record.created,
            }
        )
    mounts = []
    if spec.attrs.get("cache-mounts", "false").lower() == "true":
        for mount in _mount_blobs(store, compression, vertex):
            layers[mount["digest"]] = {k: mount[k] for k in ("digest", "size", "diff_id", "mediaType", "compression")}
            mounts.append(mount)
    order = list(layers)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layers[lid]["diff_id"] for lid in order]},
        _CACHE_KEY: {
            "records": records,
            "layers": [{"id": lid, **layers[lid]} for lid in order],
            "mounts": mounts,
        },
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = store.put_blob_bytes(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": len(config_bytes)},
        "layers": [
            {"mediaType": layers[lid]["mediaType"], "digest": layers[lid]["digest"], "size": layers[lid]["size"]}
            for lid in order
        ],
    }
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    vertex.log("stdout", f"{len(records)} records, {len(order)} layers, {len(mounts)} cache mounts\n".encode())
    if spec.type == "local":
        _write_layout(store, Path(spec.attrs["dest"]), spec.attrs.get("tag", "latest"), manifest_bytes,
                      [config_digest] + [layers[lid]["digest"] for lid in order])
    else:
        _push(store, spec.attrs["ref"], manifest_bytes, config_bytes, config_digest,
              [layers[lid] for lid in order], vertex)
    vertex.log("stdout", f"writing cache manifest sha256:{hashlib.sha256(manifest_bytes).hexdigest()} done\n".encode())


def inline_metadata(store: Store, solver: Any, root: llb.Op | None, state: tuple[str, ...]) -> dict[str, Any]:
    """``--cache-to type=inline``: the records of the final image's steps (min mode), for
    its config. Each names its layers by how many of the image's layers it is made of,
    so the image's own layer blobs carry the cache."""
    records = []
    for op in _chain_ops(root):
        if isinstance(op, llb.SourceOp) and op.identifier.startswith("local://"):
            continue
        record = store.record(solver.solved_key(op))
        if record is None or record.layers != list(state[: len(record.layers)]):
            continue
        records.append(
            {"key": record.key, "layers": len(record.layers), "description": record.description,
             "type": record.type, "owns": record.owns, "refs": record.refs}
        )  # fmt: skip
    return {"layers": list(state), "records": records}


def with_inline_cache(config: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    return {**config, _INLINE_KEY: metadata}


def _layer_blob(store: Store, lid: str, compression: str) -> dict[str, Any]:
    """A layer's blob: the one it came with (a base image's), else made once and kept."""
    from dockbuild.engine import layers

    found = layers.lookup_any(store, lid, (compression, *layers.KINDS))
    blob = found or layers.make_layer_blob(store, lid, compression)
    return {"digest": blob.digest, "size": blob.size, "diff_id": blob.diff_id,
            "mediaType": blob.media_type(), "compression": blob.kind}  # fmt: skip


def _mount_blobs(store: Store, compression: str, vertex: Any) -> list[dict[str, Any]]:
    """One blob per RUN --mount=type=cache directory (its shared instance), made while
    holding the mount's lock exclusively, so no build changes it half-way."""
    import fcntl
    import time

    from dockbuild.engine.layers import tree_blob

    out: list[dict[str, Any]] = []
    base = store.root / "mounts"
    if not base.is_dir():
        return out
    for home in sorted(p for p in base.iterdir() if p.is_dir()):
        content = home / "0"
        if not content.is_dir():
            continue
        label = (home / "id").read_text().strip() if (home / "id").exists() else home.name
        with open(home / "0.lock", "a+") as lock:
            deadline = time.monotonic() + 30
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
            if time.monotonic() > deadline:
                vertex.log("stderr", f"cache mount {label}: in use, not exported\n".encode())
                continue
            blob = tree_blob(store, content, compression)
        out.append({
            "name": home.name, "id": label, "digest": blob.digest, "size": blob.size,
            "diff_id": blob.diff_id, "mediaType": blob.media_type(), "compression": blob.kind,
        })  # fmt: skip
    return out


def _import_mounts(store: Store, source: _Source, progress: Progress) -> int:
    """Restore exported cache mounts this cache root does not have yet."""
    import fcntl

    count = 0
    for mount in source.mounts:
        name = str(mount.get("name", ""))
        if not re.fullmatch(r"[0-9a-f]{32}", name):
            continue  # not a name engine/mounts.py makes: never a path outside mounts/
        home = store.root / "mounts" / name
        if (home / "0").exists():
            continue
        home.mkdir(parents=True, exist_ok=True)
        with open(home / "create.lock", "a+") as guard:  # engine/mounts.py's creation lock
            fcntl.flock(guard, fcntl.LOCK_EX)
            if (home / "0").exists():
                continue
            work = store.tempdir("r")
            try:
                blob = work / "blob"
                source.fetch(mount, blob)
                unpacked = home / f".import-{os.getpid()}-{os.urandom(4).hex()}"
                try:
                    got = unpack_verified(blob, unpacked)
                    if got != mount["diff_id"]:
                        raise DockbuildError(f"cache mount {mount.get('id')}: content is {got}, expected {mount['diff_id']}")
                    if not (home / "id").exists():
                        _atomic_write(home / "id", f"{mount.get('id', name)}\n".encode())
                    os.rename(unpacked, home / "0")
                finally:
                    remove_tree(unpacked)
            finally:
                remove_tree(work)
        count += 1
    return count


def _write_layout(store: Store, dest: Path, tag: str, manifest: bytes, blobs: list[str]) -> None:
    """Add the export to an OCI layout directory; every file lands by rename."""
    blob_dir = dest / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    for digest in blobs:
        target = blob_dir / digest.partition(":")[2]
        if not target.exists():
            _atomic_copy(store.blob_path(digest), target)
    target = blob_dir / manifest_digest.partition(":")[2]
    if not target.exists():
        _atomic_write(target, manifest)
    if not (dest / "oci-layout").exists():
        _atomic_write(dest / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    index_path = dest / "index.json"
    try:
        index = json.loads(index_path.read_bytes())
    except (OSError, ValueError):
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}
    index["manifests"] = [
        m for m in index.get("manifests", [])
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
    ] + [{
        "mediaType": MANIFEST_MEDIA_TYPE,
        "digest": manifest_digest,
        "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]  # fmt: skip
    _atomic_write(index_path, json.dumps(index, indent=2).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _atomic_copy(src: Path, dest: Path) -> None:
    import shutil

    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _verified_copy(src: Path, dest: Path, digest: str) -> None:
    """Copy a blob of a local cache, checking its digest on the way."""
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            h.update(chunk)
            fout.write(chunk)
    if "sha256:" + h.hexdigest() != digest:
        raise DockbuildError(f"cache blob {digest} in {src.parent.parent.parent} is corrupt")


def _push(store: Store, ref_text: str, manifest: bytes, config: bytes, config_digest: str,
          layers: list[dict[str, Any]], vertex: Any) -> None:
    from dockbuild.engine.registry.client import RegistryClient
    from dockbuild.engine.registry.hosts import load_hosts
    from dockbuild.engine.registry.push import PushBlob, Pusher
    from dockbuild.engine.registry.reference import parse_reference

    ref = parse_reference(ref_text)
    blobs = [PushBlob(config_digest, len(config), data=config)]
    blobs += [PushBlob(layer["digest"], layer["size"], path=store.blob_path(layer["digest"])) for layer in layers]
    client = RegistryClient(insecure=load_hosts().insecure)  # config.toml's insecure registries
    try:
        pusher = Pusher(client, log=lambda text: vertex.log("stdout", text.encode()))
        pusher.push(ref, blobs, manifest, MANIFEST_MEDIA_TYPE, tags=[ref.tag or "latest"] if not ref.digest else [])
    finally:
        with contextlib.suppress(Exception):
            client.close()


# -- import ---------------------------------------------------------------------------------


@dataclass
class _Source:
    spec: CacheSpec
    records: dict[str, dict[str, Any]]
    layers: dict[str, dict[str, Any]]
    fetch: Any  # (layer dict, dest Path) -> None
    mounts: list[dict[str, Any]] = field(default_factory=list)


def open_sources(
    specs: list[CacheSpec], client: Callable[[], Any], progress: Progress
) -> Callable[[], list[_Source]]:
    """Start reading every ``--cache-from``'s manifest and config, each in a thread of its
    own, so they arrive while the frontend resolves base images; the function returned
    waits for them (and reports them). ``client()`` is the build's registry client (one
    keep-alive session), asked for only by a registry cache."""
    import threading

    vertices = [progress.vertex(f"importing cache manifest from {spec.describe()}") for spec in specs]
    opened: list[_Source | str] = ["not read"] * len(specs)  # a source, or why not

    def open_one(index: int, spec: CacheSpec) -> None:
        try:
            opened[index] = _open(spec, client)
        except DockbuildError as e:
            opened[index] = e.message
        except OSError as e:
            opened[index] = str(e)
        except (ValueError, KeyError, TypeError):
            opened[index] = "not a valid dockbuild cache export"

    threads = [
        threading.Thread(target=open_one, args=(i, spec), daemon=True) for i, spec in enumerate(specs)
    ]
    for thread in threads:
        thread.start()

    def wait() -> list[_Source]:
        sources = []
        for index, (thread, vertex) in enumerate(zip(threads, vertices, strict=True)):
            thread.join()
            result = opened[index]
            if isinstance(result, str):
                # A missing cache is normal on a first build: say so and go on, as BuildKit does.
                vertex.log("stderr", f"cache not imported: {result}\n".encode())
            else:
                sources.append(result)
            vertex.done()
        return sources

    return wait


def import_cache(
    store: Store, solver: Any, root: llb.Op | None, sources: list[_Source], progress: Progress
) -> int:
    """Bring in the records this build can use from the opened caches; return how many.

    Layers come in packed (their blobs, verified); they are unpacked only when a step
    that must run reads them, or an export needs their files (Store.unpacked_paths).
    """
    if not sources:
        return 0
    imported = 0
    for source in sources:
        if source.mounts:
            restored = _import_mounts(store, source, progress)
            if restored:
                progress.message(f"restored {restored} cache mount(s) from {source.spec.describe()}")
    seen: set[str] = set()
    todo = [root]
    while todo:
        op = todo.pop()
        if op is None or op.digest in seen:
            continue
        seen.add(op.digest)
        if isinstance(op, llb.SourceOp) and op.identifier.startswith("local://"):
            continue
        key = solver.keys.key(op)
        if store.get_record(key) is not None:
            continue
        found = next((s for s in sources if key in s.records), None)
        if found is not None and _import_record(store, found, found.records[key], progress):
            imported += 1
            continue
        todo.extend(op.inputs())
    # Records below an imported one need nothing more (their layers came with it): take
    # them too, so this build's own records (and a re-exported cache) are complete.
    for source in sources:
        for key, record in source.records.items():
            if store.record(key) is None and all(store.has_layer(lid) for lid in record["layers"]):
                _import_record(store, source, record, progress)
    return imported


_LAYER_ID = re.compile(r"[0-9a-f]{20}")  # cachekeys.layer_id: a directory name under snapshots/
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _open(spec: CacheSpec, client: Callable[[], Any]) -> _Source:
    if spec.type == "local":
        layout = Path(spec.attrs["src"])
        index = json.loads((layout / "index.json").read_bytes())
        wanted = spec.attrs.get("digest")
        tag = spec.attrs.get("tag", "latest")
        entry = next(
            (m for m in index.get("manifests", [])
             if (wanted and m.get("digest") == wanted)
             or (not wanted and m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)),
            None,
        )  # fmt: skip
        if entry is None:
            raise DockbuildError(f"no cache manifest {wanted or tag!r} in {layout}")

        def read(digest: str) -> bytes:
            if not _DIGEST.fullmatch(digest):
                raise DockbuildError(f"{layout}: invalid digest {digest!r}")
            data = (layout / "blobs" / "sha256" / digest.partition(":")[2]).read_bytes()
            if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                raise DockbuildError(f"cache blob {digest} in {layout} is corrupt")
            return data

        manifest = json.loads(read(entry["digest"]))
        config = json.loads(read(manifest["config"]["digest"]))

        def fetch(layer: dict[str, Any], dest: Path) -> None:
            _verified_copy(layout / "blobs" / "sha256" / layer["digest"].partition(":")[2], dest, layer["digest"])

    else:
        from dockbuild.engine.registry.client import Descriptor
        from dockbuild.engine.registry.reference import parse_reference

        ref = parse_reference(spec.attrs["ref"])
        registry = client()
        # Not registry.resolve() first: that accepts container images only, and a cache
        # manifest is not one. An image (with an inline cache) is resolved as an image.
        data, _, _ = registry.fetch_manifest(ref)
        manifest = json.loads(data)
        if isinstance(manifest.get("config"), dict) and manifest["config"].get("mediaType") == CONFIG_MEDIA_TYPE:
            config_desc = Descriptor.from_json(manifest.get("config"), str(ref))
            config = json.loads(registry.fetch_blob_bytes(ref, config_desc, 64 << 20))
        else:
            config = _inline_as_export(registry.resolve(ref))

        def fetch(layer: dict[str, Any], dest: Path) -> None:
            registry.fetch_blob(ref, Descriptor(layer["mediaType"], layer["digest"], layer["size"]), dest)

    data = config.get(_CACHE_KEY)
    if not isinstance(data, dict):
        raise DockbuildError(f"{spec.describe()} is not a dockbuild cache export")
    # What the cache says becomes file names here: nothing may point outside the store.
    layers = {layer["id"]: layer for layer in data.get("layers", [])}
    mounts = list(data.get("mounts", []))
    for blob in [*layers.values(), *mounts]:
        if not (
            _DIGEST.fullmatch(str(blob["digest"]))
            and _DIGEST.fullmatch(str(blob["diff_id"]))
            and blob["compression"] in ("gzip", "zstd", "uncompressed")
        ):
            raise DockbuildError(f"{spec.describe()}: the cache names an invalid blob {blob['digest']!r}")
    records = {r["key"]: r for r in data.get("records", [])}
    for record in records.values():
        ids, refs = [*record["layers"], *record.get("owns", [])], record.get("refs", [])
        if not all(_LAYER_ID.fullmatch(str(lid)) for lid in ids) or not all(_DIGEST.fullmatch(str(d)) for d in refs):
            raise DockbuildError(f"{spec.describe()}: the cache has an invalid record {record['key']!r}")
    return _Source(spec, records, layers, fetch, mounts)


def _import_layer(store: Store, source: _Source, layer: dict[str, Any]) -> None:
    """The layer's blob, fetched once and verified, recorded as a packed layer."""
    lid = layer["id"]
    with store.lock("layer:" + lid):
        if store.has_layer(lid):
            return
        if not store.has_blob(layer["digest"]):
            tmp = store.tempdir("i") / "blob"
            source.fetch(layer, tmp)  # verified against the digest on the way in
            store.put_blob_file(tmp, layer["digest"])
        store.add_packed_layer(
            BlobInfo(lid, layer["compression"], layer["digest"], layer["size"]),
            layer["diff_id"],
            created=_created(layer),
        )


def _created(entry: dict[str, Any]) -> float | None:
    """An exported layer's or record's creation time (seconds since the epoch); None when
    the cache has none (an export older than the field) or a value that is not a time."""
    value = entry.get("created")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 <= value < 1e11 else None


def _inline_as_export(image: Any) -> dict[str, Any]:
    """An image's inline cache, in the shape of a cache export's config."""
    from dockbuild.engine.sources.image import compression_of

    config: dict[str, Any] = json.loads(image.config)
    inline = config.get(_INLINE_KEY)
    if not isinstance(inline, dict):
        return config  # no cache in it: the caller says so
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    ids = inline.get("layers", [])
    if len(ids) != len(image.layers) or len(diff_ids) != len(ids):
        raise DockbuildError("the image's inline cache does not match its layers (squashed?)")
    made = _layer_times(config, len(ids))
    layers = [
        {"id": lid, "digest": d.digest, "size": d.size, "mediaType": d.media_type,
         "diff_id": diff_ids[i], "compression": compression_of(d.media_type), "created": made[i]}
        for i, (lid, d) in enumerate(zip(ids, image.layers, strict=True))
    ]  # fmt: skip
    records = []
    for r in inline.get("records", []):
        count = int(r["layers"])
        # A record is dated by its last layer: the step's own, or the one it was built on.
        records.append({**r, "layers": ids[:count], "created": made[count - 1] if 0 < count <= len(made) else None})
    return {_CACHE_KEY: {"records": records, "layers": layers}}


def _layer_times(config: dict[str, Any], count: int) -> list[float | None]:
    """When each of an image's layers was made: the ``created`` of the history entries that
    add a layer (those without ``empty_layer``), in order. They are the times the exporting
    build gave its steps, so a build from its inline cache writes the same history; all None
    when the history does not line up with the layers."""
    history = config.get("history")
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        return [None] * count
    times = [_rfc3339(entry.get("created")) for entry in history if not entry.get("empty_layer")]
    return times if len(times) == count else [None] * count


def _rfc3339(value: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 time (a history ``created``); None when it is
    not one. Digits past the microsecond are dropped: dockbuild writes microseconds."""
    import datetime

    if not isinstance(value, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None


def _import_record(store: Store, source: _Source, record: dict[str, Any], progress: Progress) -> bool:
    """Bring one record in: its missing layers (fetched in parallel), then the record
    itself, last, so a killed import leaves no record without its layers."""
    import concurrent.futures

    missing = [lid for lid in record["layers"] if not store.has_layer(lid)]
    if any(lid not in source.layers for lid in missing):
        return False
    if missing:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            for job in [pool.submit(_import_layer, store, source, source.layers[lid]) for lid in missing]:
                job.result()
    store.put_record(
        record["key"],
        record["layers"],
        record["description"],
        type=record.get("type", "regular"),
        owns=record.get("owns", []),
        refs=record.get("refs", []),
        inputs=record.get("inputs"),
        created=_created(record),
    )
    return True
