"""Layer compression: reproducible blobs and the media types that name them."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import pytest

from dockbuild.engine.compression import (
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


def _mixed(megabytes: int) -> bytes:
    text = bytes.maketrans(bytes(range(256)), bytes(b"abcdefgh "[i % 9] for i in range(256)))
    return b"".join(
        os.urandom(1 << 19) if i % 2 else os.urandom(1 << 19).translate(text)
        for i in range(2 * megabytes)
    )


def test_parallel_gzip_is_one_ordinary_gzip_member_that_tools_read(tmp_path: Path) -> None:
    import subprocess

    data = _mixed(3) + b"tail"  # several blocks, the last one short
    src = tmp_path / "layer.tar"
    src.write_bytes(data)
    compress(src, tmp_path / "g", "gzip")
    blob = (tmp_path / "g").read_bytes()
    assert gzip.decompress(blob) == data
    tested = subprocess.run(["gzip", "-t"], input=blob, capture_output=True, check=False)
    assert tested.returncode == 0, tested.stderr
    # One member: nothing is left after the first member's end.
    import zlib

    reader = zlib.decompressobj(wbits=31)
    assert reader.decompress(blob) == data
    assert reader.eof and reader.unused_data == b""


def test_parallel_gzip_bytes_do_not_depend_on_the_number_of_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dockbuild.engine import compression

    src = tmp_path / "layer.tar"
    src.write_bytes(_mixed(2) + b"x")
    blobs = []
    for workers in (1, 2, 4):
        monkeypatch.setattr(compression, "_workers", lambda w=workers: w)
        for kind in ("gzip", "zstd"):
            compress(src, tmp_path / f"{kind}{workers}", kind)
        blobs.append(
            ((tmp_path / f"gzip{workers}").read_bytes(), (tmp_path / f"zstd{workers}").read_bytes())
        )
    assert blobs[0] == blobs[1] == blobs[2]


def test_empty_input_compresses_to_valid_streams(tmp_path: Path) -> None:
    import zstandard

    src = tmp_path / "empty"
    src.write_bytes(b"")
    compress(src, tmp_path / "g", "gzip")
    compress(src, tmp_path / "z", "zstd")
    assert gzip.decompress((tmp_path / "g").read_bytes()) == b""
    reader = zstandard.ZstdDecompressor().stream_reader((tmp_path / "z").open("rb"))
    assert reader.read() == b""


def test_compression_levels_are_checked() -> None:
    from dockbuild.engine.compression import check_level

    check_level("gzip", 9)
    check_level("zstd", 22)
    for kind, level in (("gzip", 10), ("zstd", 23), ("uncompressed", 1), ("gzip", -1)):
        with pytest.raises(ValueError):
            check_level(kind, level)
