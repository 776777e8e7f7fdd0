"""Layer compression (gzip, zstd, none) with reproducible bytes, and the media types.

Reproducible means: the same uncompressed tar, kind and level give the same blob on every
run and on every machine. gzip is written by Python's zlib with a fixed header (mtime 0,
no file name, OS byte 255 "unknown", as Go writes it), in fixed 1 MiB blocks compressed
in parallel (pigz's scheme: one gzip member); zstd by the ``zstandard`` package as one
frame with a checksum and no content size, with worker threads (zstd's multi-threaded
output does not depend on the number of workers). Other zlib or zstd library versions
may still produce other bytes, as with any builder.
"""

from __future__ import annotations

import enum
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from dockbuild.atomic import atomic_file

if TYPE_CHECKING:
    from concurrent.futures import Future

_CHUNK = 1 << 20

# BuildKit's defaults: Go's gzip.DefaultCompression (6) and zstd level 3.
DEFAULT_GZIP_LEVEL = 6
DEFAULT_ZSTD_LEVEL = 3


class Compression(enum.StrEnum):
    """How a layer blob is compressed (the ``compression=`` output option)."""

    UNCOMPRESSED = "uncompressed"
    GZIP = "gzip"
    ZSTD = "zstd"


# Media types (OCI image-spec and Docker image manifest v2 schema 2).
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"

_LAYER_TYPES = {
    Compression.UNCOMPRESSED: (OCI_LAYER, DOCKER_LAYER),
    Compression.GZIP: (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP),
    # Docker never defined a zstd type that engines accept; BuildKit keeps the OCI one.
    Compression.ZSTD: (OCI_LAYER_ZSTD, OCI_LAYER_ZSTD),
}


def layer_media_type(kind: Compression | str, oci: bool) -> str:
    """The media type of a layer blob compressed with ``kind``."""
    oci_type, docker_type = _LAYER_TYPES[Compression(kind)]
    return oci_type if oci else docker_type


def layer_compression(media_type: str) -> Compression:
    """The compression a layer media type announces."""
    for kind, types in _LAYER_TYPES.items():
        if media_type in types:
            return kind
    raise ValueError(f"not a layer media type: {media_type}")


def convert_layer_media_type(media_type: str, oci: bool) -> str:
    """The same layer's media type in the other family (OCI <-> Docker) when asked."""
    try:
        return layer_media_type(layer_compression(media_type), oci)
    except ValueError:
        return media_type  # foreign or unknown layers keep their type


def manifest_media_type(oci: bool) -> str:
    return OCI_MANIFEST if oci else DOCKER_MANIFEST


def config_media_type(oci: bool) -> str:
    return OCI_CONFIG if oci else DOCKER_CONFIG


class HashingWriter:
    """Counts and hashes what passes through to ``out``."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


# gzip is compressed in independent blocks of this size on all cores, pigz-style: each
# block is a raw deflate stream primed with the previous block's last 32 KiB and ended
# with a sync flush, so the concatenation is ONE ordinary gzip member. The block size is
# fixed (not derived from the core count), so the bytes are the same on every machine.
GZIP_BLOCK = 1 << 20
_GZIP_WINDOW = 32 << 10


def _workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


class ParallelGzipWriter:
    """A write-only file object producing a deterministic gzip stream on all cores."""

    def __init__(self, out: BinaryIO, level: int = DEFAULT_GZIP_LEVEL) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.out = out
        self.level = level
        self.crc = 0
        self.size = 0
        self.pending = bytearray()
        self.previous_tail = b""
        self.queue: list[Future[bytes]] = []
        self.pool = ThreadPoolExecutor(max_workers=_workers())
        self.in_flight = 2 * _workers()
        # Go's header: no name, mtime 0, XFL 2/4 only for best/fastest, OS 255 unknown.
        xfl = 2 if level == 9 else 4 if level == 1 else 0
        out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + bytes([xfl, 255]))

    def write(self, data: bytes) -> int:
        self.pending += data
        while len(self.pending) > GZIP_BLOCK:
            # Keep at least one byte back, so the last block is always known at close.
            block = bytes(self.pending[:GZIP_BLOCK])
            del self.pending[:GZIP_BLOCK]
            self._submit(block, last=False)
        return len(data)

    def _submit(self, block: bytes, *, last: bool) -> None:
        import zlib

        self.crc = zlib.crc32(block, self.crc)
        self.size += len(block)
        self.queue.append(
            self.pool.submit(_deflate_block, block, self.previous_tail, self.level, last)
        )
        self.previous_tail = block[-_GZIP_WINDOW:]
        while len(self.queue) > self.in_flight:
            self.out.write(self.queue.pop(0).result())

    def flush(self) -> None:
        pass

    def close(self) -> None:
        try:
            self._submit(bytes(self.pending), last=True)
            self.pending = bytearray()
            for future in self.queue:
                self.out.write(future.result())
            self.queue = []
            self.out.write(
                self.crc.to_bytes(4, "little") + (self.size & 0xFFFFFFFF).to_bytes(4, "little")
            )
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _deflate_block(block: bytes, dictionary: bytes, level: int, last: bool) -> bytes:
    import zlib

    if dictionary:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, dictionary)
    else:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY)
    return c.compress(block) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class _ZstdWriter:
    """zstd on all cores; the output does not depend on the number of worker threads."""

    def __init__(self, out: BinaryIO, level: int = DEFAULT_ZSTD_LEVEL) -> None:
        import zstandard  # lazily: most builds never need it

        compressor = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=False, threads=_workers()
        )
        self.writer = compressor.stream_writer(out, closefd=False)

    def write(self, data: bytes) -> int:
        self.writer.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.writer.close()  # type: ignore[no-untyped-call]  # zstandard ships no type hints

    def abort(self) -> None:
        pass


class _PlainWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def write(self, data: bytes) -> int:
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def open_compressor(out: BinaryIO, kind: Compression | str, level: int | None = None) -> Any:
    """A write-only file object compressing into ``out``; call ``close()`` to finish it.

    ``abort()`` releases its threads without finishing the stream.
    """
    kind = Compression(kind)
    if kind is Compression.GZIP:
        return ParallelGzipWriter(out, DEFAULT_GZIP_LEVEL if level is None else level)
    if kind is Compression.ZSTD:
        return _ZstdWriter(out, DEFAULT_ZSTD_LEVEL if level is None else level)
    return _PlainWriter(out)


def check_level(kind: Compression | str, level: int | None) -> None:
    """Refuse a compression level the kind does not have (gzip 0-9, zstd 0-22)."""
    if level is None:
        return
    top = {Compression.GZIP: 9, Compression.ZSTD: 22}.get(Compression(kind))
    if top is None or not 0 <= level <= top:
        raise ValueError(
            f"compression-level={level} is out of range for {kind}"
            + (f" (0-{top})" if top is not None else " (it takes no level)")
        )


def compress_stream(
    src: BinaryIO, dst: BinaryIO, kind: Compression | str, level: int | None = None
) -> tuple[str, int]:
    """Compress ``src`` into ``dst``; return the ``sha256:`` digest and size written."""
    out = HashingWriter(dst)
    writer = open_compressor(out, kind, level)  # type: ignore[arg-type]  # a write-only HashingWriter, not a full BinaryIO
    try:
        while chunk := src.read(_CHUNK):
            writer.write(chunk)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return f"sha256:{out.sha.hexdigest()}", out.size


def compress(
    src_path: Path, dst_path: Path, kind: Compression | str, level: int | None = None
) -> tuple[str, int]:
    """Compress the file ``src_path`` into ``dst_path`` atomically; return (digest, size)."""
    with open(src_path, "rb") as src, atomic_file(Path(dst_path)) as dst:
        return compress_stream(src, dst, kind, level)
