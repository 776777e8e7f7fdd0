"""The one writer of layer blobs: a layer's diff -> tar -> compressed blob in one pass,
recorded in the store by layer id and variant.

The tar is hashed (its diff_id) on its way into the compressor and the blob (its digest)
on its way out, so neither is written twice nor read back. A blob is kept in the store's
``layer_blobs`` table under a *variant key*:

- a plain compression kind (``gzip``, ``zstd``, ``uncompressed``) for the blob made with
  default options; the layer's diff_id is its own row;
- ``KIND;level=N;clamp=T;squash=I`` for any other: the row names a small JSON blob that
  holds the real blob's kind, digest, size and diff_id, and a second row, the key plus
  :data:`BLOB_ROW_SUFFIX`, names the real blob itself, so whatever walks the table (GC)
  sees it in use. :func:`blobs_in_use` is how GC reads a row.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

from dockbuild.engine.store import BlobInfo, Store

KINDS = ("gzip", "zstd", "uncompressed")
BLOB_ROW_SUFFIX = ";blob"


class Blob(NamedTuple):
    """A compressed layer blob in the store and the diff_id of the tar inside it."""

    kind: str  # gzip | zstd | uncompressed
    digest: str
    size: int
    diff_id: str

    def media_type(self, oci: bool = True) -> str:
        from dockbuild.engine.compression import layer_media_type

        return layer_media_type(self.kind, oci)


def variant_key(
    kind: str, *, level: int | None = None, clamp: int | None = None, squash: int | None = None
) -> str:
    """The store's name for a blob variant; the plain kind for the default one."""
    parts = [kind]
    if level is not None:
        parts.append(f"level={level}")
    if clamp is not None:
        parts.append(f"clamp={clamp}")
    if squash is not None:
        parts.append(f"squash={squash}")
    return ";".join(parts)


def _is_variant(key: str) -> bool:
    return ";" in key


def lookup(store: Store, layer_id: str, key: str) -> Blob | None:
    """The blob recorded for ``layer_id`` under ``key``, if it is still in the store."""
    if not _is_variant(key):
        info = store.layer_blob(layer_id, key)
        diff_id = store.layer_diff_id(layer_id)
        if info is None or diff_id is None:
            return None
        return Blob(key, info.digest, info.size, diff_id)
    row = store.layer_blob(layer_id, key)
    if row is None:
        return None
    try:
        meta = json.loads(store.blob_path(row.digest).read_bytes())
        blob = Blob(meta["kind"], meta["digest"], int(meta["size"]), meta["diff_id"])
    except (OSError, ValueError, KeyError):
        return None
    return blob if store.has_blob(blob.digest) else None


def lookup_any(store: Store, layer_id: str, kinds: tuple[str, ...] = KINDS) -> Blob | None:
    """The first of the plain blobs of ``layer_id`` that exists, in the order of ``kinds``."""
    for kind in dict.fromkeys(kinds):
        if (blob := lookup(store, layer_id, kind)) is not None:
            return blob
    return None


def remember(store: Store, layer_id: str, key: str, blob: Blob) -> None:
    """Record ``blob`` as the ``key`` variant of ``layer_id``."""
    if not _is_variant(key):
        store.set_layer_diff_id(layer_id, blob.diff_id)
        store.set_layer_blob(BlobInfo(layer_id, key, blob.digest, blob.size))
        return
    meta = json.dumps(
        {"kind": blob.kind, "digest": blob.digest, "size": blob.size, "diff_id": blob.diff_id},
        sort_keys=True,
    ).encode()
    digest = store.put_blob_bytes(meta)
    store.set_layer_blob(BlobInfo(layer_id, key + BLOB_ROW_SUFFIX, blob.digest, blob.size))
    store.set_layer_blob(BlobInfo(layer_id, key, digest, len(meta)))


def blobs_in_use(store: Store, row: BlobInfo) -> set[str]:
    """The blob digests a ``layer_blobs`` row keeps: its own, and for a variant's JSON
    row the blob it names."""
    digests = {row.digest}
    if _is_variant(row.compression) and not row.compression.endswith(BLOB_ROW_SUFFIX):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            digests.add(str(json.loads(store.blob_path(row.digest).read_bytes())["digest"]))
    return digests


def write_blob(
    store: Store, kind: str, level: int | None, write_tar: Callable[[BinaryIO], None]
) -> Blob:
    """Compress the tar that ``write_tar(file)`` writes into the blob store, in one pass."""
    from dockbuild.engine.compression import HashingWriter, open_compressor

    work = store.tempdir("e")
    blob_path = work / "blob"
    try:
        with open(blob_path, "wb") as dst:
            blob = HashingWriter(dst)
            writer = open_compressor(blob, kind, level)  # type: ignore[arg-type]  # writes like one
            tee = HashingWriter(writer)
            try:
                write_tar(tee)  # type: ignore[arg-type]  # a write-only file object
                writer.close()
            except BaseException:
                writer.abort()
                raise
            dst.flush()
            os.fsync(dst.fileno())
        digest, size = store.put_blob_file(blob_path, "sha256:" + blob.sha.hexdigest())
    finally:
        with contextlib.suppress(OSError):
            blob_path.unlink()
        with contextlib.suppress(OSError):
            work.rmdir()
    return Blob(kind, digest, size, "sha256:" + tee.sha.hexdigest())


def recompress(store: Store, kind: str, level: int | None, source: Path) -> Blob:
    """The blob ``source`` (any compression) compressed as ``kind``: its tar, and so its
    diff_id, stays byte for byte."""
    from dockbuild.engine import archive

    def copy(out: BinaryIO) -> None:
        with archive.open_blob(source) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)

    return write_blob(store, kind, level, copy)


def tree_blob(store: Store, directory: Path, kind: str, *, clamp: int | None = None) -> Blob:
    """The layer directory ``directory`` (overlay format) as a blob; not recorded."""
    from dockbuild.engine import archive

    return write_blob(
        store, kind, None, lambda f: archive.write_layer_tar(directory, f, clamp_mtime=clamp)
    )


def make_layer_blob(
    store: Store, layer_id: str, kind: str, *, level: int | None = None, clamp: int | None = None
) -> Blob:
    """Make the ``kind`` blob of the layer ``layer_id`` from its files (a packed layer is
    unpacked first), with its file times clamped to ``clamp``, and record it."""
    from dockbuild.engine import archive

    (path,) = store.unpacked_paths([layer_id])
    blob = write_blob(
        store, kind, level, lambda f: archive.write_layer_tar(path, f, clamp_mtime=clamp)
    )
    remember(store, layer_id, variant_key(kind, level=level, clamp=clamp), blob)
    return blob
