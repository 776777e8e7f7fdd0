"""engine.layers, the one writer of layer blobs: one pass from a layer's files to a
compressed blob with the right digests, recorded so that a second call makes nothing,
and its variant rows kept alive by GC."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from dockbuild.engine import archive, layers
from dockbuild.engine.gc import CacheIndex
from dockbuild.engine.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "root")
    work = s.tempdir("t")
    (work / "etc").mkdir()
    (work / "etc" / "hello.txt").write_text("hello\n")
    os.utime(work / "etc" / "hello.txt", (2_000_000_000, 2_000_000_000))
    s.commit_layer("layer1", work)
    return s


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_layer_blob_has_the_digests_of_its_bytes_and_of_the_tar_inside(store: Store) -> None:
    blob = layers.make_layer_blob(store, "layer1", "gzip")
    data = store.blob_path(blob.digest).read_bytes()
    tar = gzip.decompress(data)
    assert blob.digest == _sha(data) and blob.size == len(data)
    assert blob.diff_id == _sha(tar)
    expected = io.BytesIO()
    archive.write_layer_tar(store.layer_path("layer1"), expected)
    assert tar == expected.getvalue()
    assert blob.media_type() == "application/vnd.oci.image.layer.v1.tar+gzip"


def test_a_made_blob_is_found_again_and_the_diff_id_is_recorded(store: Store) -> None:
    blob = layers.make_layer_blob(store, "layer1", "zstd")
    assert layers.lookup(store, "layer1", "zstd") == blob
    assert layers.lookup_any(store, "layer1") == blob  # the only kind there is
    assert store.layer_diff_id("layer1") == blob.diff_id
    assert layers.lookup(store, "layer1", "gzip") is None


def test_a_clamped_variant_is_recorded_apart_and_gc_keeps_its_blob(store: Store) -> None:
    plain = layers.make_layer_blob(store, "layer1", "uncompressed")
    clamped = layers.make_layer_blob(store, "layer1", "uncompressed", clamp=1_000_000_000)
    assert clamped.digest != plain.digest  # the file time was clamped in the tar
    with tarfile.open(store.blob_path(clamped.digest)) as tar:
        assert tar.getmember("etc/hello.txt").mtime == 1_000_000_000
    key = layers.variant_key("uncompressed", clamp=1_000_000_000)
    assert key == "uncompressed;clamp=1000000000"
    assert layers.lookup(store, "layer1", key) == clamped
    assert layers.lookup(store, "layer1", "uncompressed") == plain  # untouched
    kept = CacheIndex.load(store).blobs_of_layer["layer1"]
    assert {plain.digest, clamped.digest} <= kept


def test_recompressing_keeps_the_tar_and_its_diff_id(store: Store) -> None:
    gz = layers.make_layer_blob(store, "layer1", "gzip")
    zst = layers.recompress(store, "zstd", 19, store.blob_path(gz.digest))
    assert zst.kind == "zstd" and zst.diff_id == gz.diff_id and zst.digest != gz.digest


def test_a_failed_tar_leaves_no_blob_and_no_temp_file(store: Store) -> None:
    before = set(store.blob_digests())

    def broken(out: object) -> None:
        out.write(b"x" * 1000)  # type: ignore[attr-defined]
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        layers.write_blob(store, "gzip", None, broken)
    assert set(store.blob_digests()) == before
    assert not any(p.name.startswith("e") for p in store.tempdir("x").parent.iterdir())
