"""Reading images from OCI image layout directories (oci-layout:// sources)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from registry_fixture import TinyImage, attestation_entry, oci_index, tiny_image

from dockbuild.engine.sources.oci_layout import blob_path, resolve_layout
from dockbuild.errors import DigestMismatchError, DockbuildError

REF_NAME = "org.opencontainers.image.ref.name"
MultiLayout = tuple[Path, TinyImage, TinyImage]


def _write_blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": digest,
        "size": len(data),
    }


def _layout(root: Path, entries: list[dict[str, object]], *images: TinyImage) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (root / "index.json").write_bytes(oci_index(entries))
    for image in images:
        image.write_blobs(root)
    return root


@pytest.fixture
def multi_layout(tmp_path: Path) -> MultiLayout:
    """A buildx-style layout: index.json -> nested index (amd64, arm64, attestation)."""
    amd64, arm64 = tiny_image("amd64"), tiny_image("arm64", "v8", b"arm\n")
    attestation = tiny_image("unknown", content=b"attestation\n")
    root = _layout(tmp_path / "multi", [], amd64, arm64, attestation)
    nested = _write_blob(
        root,
        oci_index([attestation_entry(attestation), arm64.index_entry(), amd64.index_entry()]),
    )
    (root / "index.json").write_bytes(oci_index([{**nested, "annotations": {REF_NAME: "multi"}}]))
    return root, amd64, arm64


def test_busybox_layout_resolves_to_its_only_manifest(busybox_layout: Path) -> None:
    index = json.loads((busybox_layout / "index.json").read_bytes())
    image = resolve_layout(busybox_layout)
    assert image.ref is None
    assert image.manifest_digest == index["manifests"][0]["digest"]
    assert image.manifest_media_type == "application/vnd.oci.image.manifest.v1+json"
    assert image.platform == "linux/amd64"
    assert json.loads(image.config)["config"]["Cmd"] == ["sh"]
    [layer] = image.layers
    data = blob_path(busybox_layout, layer.digest).read_bytes()
    assert len(data) == layer.size
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest


def test_tag_and_digest_select_the_same_image(busybox_layout: Path) -> None:
    by_default = resolve_layout(busybox_layout)
    assert resolve_layout(busybox_layout, tag="latest") == by_default
    assert resolve_layout(busybox_layout, digest=by_default.manifest_digest) == by_default


def test_unknown_tag_names_the_available_ones(busybox_layout: Path) -> None:
    with pytest.raises(DockbuildError, match=r"no image tagged 'v9'.*tags: latest"):
        resolve_layout(busybox_layout, tag="v9")


def test_nested_index_is_followed_to_the_platform(multi_layout: MultiLayout) -> None:
    root, amd64, arm64 = multi_layout
    assert resolve_layout(root, tag="multi").manifest_digest == amd64.manifest_digest
    for platform in ("linux/arm64", "linux/arm64/v8", "linux/aarch64"):
        chosen = resolve_layout(root, tag="multi", platform=platform)
        assert chosen.manifest_digest == arm64.manifest_digest
        assert chosen.platform == "linux/arm64/v8"


def test_only_entry_is_the_default_even_untagged(multi_layout: MultiLayout) -> None:
    root, amd64, _ = multi_layout
    assert resolve_layout(root).manifest_digest == amd64.manifest_digest


def test_missing_platform_lists_what_exists(multi_layout: MultiLayout) -> None:
    root, _, _ = multi_layout
    with pytest.raises(DockbuildError) as caught:
        resolve_layout(root, platform="linux/s390x")
    assert "no image for platform linux/s390x" in caught.value.message
    assert "available: linux/arm64, linux/amd64" in caught.value.message


def test_same_tag_on_several_platform_entries_selects_by_platform(tmp_path: Path) -> None:
    amd64, arm64 = tiny_image("amd64"), tiny_image("arm64", content=b"arm\n")
    tagged = [{**i.index_entry(), "annotations": {REF_NAME: "v1"}} for i in (arm64, amd64)]
    root = _layout(tmp_path / "l", tagged, amd64, arm64)
    assert resolve_layout(root, tag="v1").manifest_digest == amd64.manifest_digest
    assert (
        resolve_layout(root, tag="v1", platform="linux/arm64").manifest_digest
        == arm64.manifest_digest
    )


def test_digest_of_a_manifest_inside_a_nested_index(multi_layout: MultiLayout) -> None:
    root, _, arm64 = multi_layout
    chosen = resolve_layout(root, digest=arm64.manifest_digest)
    assert chosen.platform == "linux/arm64/v8"


def test_several_images_without_latest_need_a_tag(tmp_path: Path) -> None:
    one, two = tiny_image("amd64"), tiny_image("amd64", content=b"two\n")
    entries = [
        {**one.index_entry(), "annotations": {REF_NAME: "one"}},
        {**two.index_entry(), "annotations": {REF_NAME: "two"}},
    ]
    root = _layout(tmp_path / "l", entries, one, two)
    with pytest.raises(DockbuildError, match=r"no image tagged 'latest' .*tags: one, two"):
        resolve_layout(root)
    assert resolve_layout(root, tag="two").manifest_digest == two.manifest_digest


def test_tampered_manifest_is_rejected(tmp_path: Path) -> None:
    image = tiny_image("amd64")
    root = _layout(tmp_path / "l", [image.index_entry()], image)
    path = blob_path(root, image.manifest_digest)
    path.write_bytes(path.read_bytes().replace(b'"layers"', b'"layerz"'))
    with pytest.raises(DigestMismatchError, match=image.manifest_digest):
        resolve_layout(root)


def test_tampered_config_is_rejected(tmp_path: Path) -> None:
    image = tiny_image("amd64")
    root = _layout(tmp_path / "l", [image.index_entry()], image)
    config_path = blob_path(root, "sha256:" + hashlib.sha256(image.config).hexdigest())
    config_path.write_bytes(image.config.replace(b"amd64", b"arm64"))
    with pytest.raises(DigestMismatchError, match="content digest mismatch"):
        resolve_layout(root)


def test_a_directory_without_oci_layout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DockbuildError, match="is not an OCI image layout"):
        resolve_layout(tmp_path)


@pytest.mark.parametrize("digest", ["sha256:../../etc/passwd", "md5:abc", "sha256:" + "A" * 64])
def test_blob_path_refuses_digests_that_are_not_digests(tmp_path: Path, digest: str) -> None:
    with pytest.raises(DockbuildError, match="invalid digest"):
        blob_path(tmp_path, digest)
