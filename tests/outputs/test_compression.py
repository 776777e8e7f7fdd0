"""Layer compression: reproducible blobs and the media types that name them."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import pytest

from dockbuild.outputs.compression import (
    DOCKER_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    Compression,
    compress,
    convert_layer_media_type,
    layer_compression,
    layer_media_type,
)


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    path = tmp_path / "layer.tar"
    path.write_bytes(os.urandom(200_000) + b"\0" * 500_000)
    return path


@pytest.mark.parametrize("kind", list(Compression))
def test_compress_is_reproducible(layer: Path, tmp_path: Path, kind: Compression) -> None:
    first = compress(layer, tmp_path / "a", kind)
    second = compress(layer, tmp_path / "b", kind)
    assert first == second
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    digest, size = first
    blob = (tmp_path / "a").read_bytes()
    assert digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert size == len(blob)


def test_gzip_header_has_no_name_and_no_time(layer: Path, tmp_path: Path) -> None:
    compress(layer, tmp_path / "g", "gzip")
    blob = (tmp_path / "g").read_bytes()
    assert blob[3] == 0  # FLG: no FNAME, no FEXTRA
    assert blob[4:8] == b"\0\0\0\0"  # MTIME
    assert blob[9] == 255  # OS unknown, as Go writes it
    assert gzip.decompress(blob) == layer.read_bytes()


def test_zstd_round_trips(layer: Path, tmp_path: Path) -> None:
    import zstandard

    compress(layer, tmp_path / "z", Compression.ZSTD)
    reader = zstandard.ZstdDecompressor().stream_reader((tmp_path / "z").open("rb"))
    assert reader.read() == layer.read_bytes()


def test_uncompressed_digest_is_the_diff_id(layer: Path, tmp_path: Path) -> None:
    digest, _ = compress(layer, tmp_path / "u", "uncompressed")
    assert digest == "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()


def test_a_failed_compression_leaves_no_file(layer: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        compress(layer, tmp_path / "out", "lz4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.tar"]


def test_media_types() -> None:
    assert layer_media_type("gzip", oci=True) == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert layer_media_type("gzip", oci=False) == DOCKER_LAYER_GZIP
    assert (
        layer_media_type("uncompressed", oci=False)
        == "application/vnd.docker.image.rootfs.diff.tar"
    )
    assert layer_media_type("zstd", oci=False) == OCI_LAYER_ZSTD
    assert layer_compression(DOCKER_LAYER_GZIP) is Compression.GZIP
    assert convert_layer_media_type(DOCKER_LAYER_GZIP, oci=True).endswith("tar+gzip")
    assert convert_layer_media_type("application/x-foreign", oci=True) == "application/x-foreign"
