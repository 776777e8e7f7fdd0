"""Layer compression (gzip, zstd, none) with reproducible bytes, and the media types.

Reproducible means: the same uncompressed tar, kind and level give the same blob on every
run. gzip is written by Python's zlib with a fixed header (mtime 0, no file name, OS byte
255 "unknown", as Go writes it); zstd by the ``zstandard`` package as one frame with a
checksum and no content size, single-threaded. Other zlib or zstd library versions may
still produce other bytes, as with any builder.
"""

from __future__ import annotations

import enum
import hashlib
from pathlib import Path
from typing import BinaryIO

from dockbuild.outputs.atomic import atomic_file

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


def index_media_type(oci: bool) -> str:
    return OCI_INDEX if oci else DOCKER_MANIFEST_LIST


class _HashingWriter:
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


def compress_stream(
    src: BinaryIO, dst: BinaryIO, kind: Compression | str, level: int | None = None
) -> tuple[str, int]:
    """Compress ``src`` into ``dst``; return the ``sha256:`` digest and size written."""
    kind = Compression(kind)
    out = _HashingWriter(dst)
    if kind is Compression.UNCOMPRESSED:
        while chunk := src.read(_CHUNK):
            out.write(chunk)
    elif kind is Compression.GZIP:
        import gzip

        # filename="" and mtime=0 keep the header free of anything run-specific.
        with gzip.GzipFile(
            filename="",
            mode="wb",
            fileobj=out,  # type: ignore[arg-type]
            compresslevel=DEFAULT_GZIP_LEVEL if level is None else level,
            mtime=0,
        ) as gz:
            while chunk := src.read(_CHUNK):
                gz.write(chunk)
    else:
        import zstandard  # lazily: most builds never need it

        params = zstandard.ZstdCompressor(
            level=DEFAULT_ZSTD_LEVEL if level is None else level,
            write_checksum=True,
            write_content_size=False,
            threads=0,
        )
        with params.stream_writer(out, closefd=False) as zw:  # type: ignore[arg-type]
            while chunk := src.read(_CHUNK):
                zw.write(chunk)
    return f"sha256:{out.sha.hexdigest()}", out.size


def compress(
    src_path: Path, dst_path: Path, kind: Compression | str, level: int | None = None
) -> tuple[str, int]:
    """Compress the file ``src_path`` into ``dst_path`` atomically; return (digest, size)."""
    with open(src_path, "rb") as src, atomic_file(Path(dst_path)) as dst:
        return compress_stream(src, dst, kind, level)
