"""Image documents: the config, manifest and index bytes BuildKit would write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dockbuild.outputs.image import (
    Descriptor,
    LayerBlob,
    build_image,
    config_json,
    familiar_name,
    go_json,
    layout_index,
    normalize_name,
    ref_name,
)

DIFF = "sha256:" + "d" * 64
BLOB = "sha256:" + "b" * 64


def sample_config() -> dict:
    return {
        "os": "linux",
        "architecture": "amd64",
        "rootfs": {"diff_ids": [DIFF], "type": "layers"},
        "config": {
            "Cmd": ["sh", "-c", "echo a > b && c < d"],
            "Env": ["PATH=/usr/bin"],
            "Labels": {"z": "1", "a": "2"},
            "User": "app",
            "WorkingDir": "/",
        },
        "history": [
            {
                "created_by": "RUN x",
                "created": "2024-01-01T00:00:00Z",
                "comment": "buildkit.dockerfile.v0",
            },
            {"empty_layer": True, "created_by": "CMD", "created": "2024-01-01T00:00:00Z"},
        ],
        "created": "2024-01-01T00:00:00Z",
    }


def test_go_json_escapes_html_like_go() -> None:
    assert go_json({"s": "a<b>&c\u2028é"}) == '{"s":"a\\u003cb\\u003e\\u0026c\\u2028é"}'.encode()


def test_config_keys_follow_buildkit_order() -> None:
    raw = config_json(sample_config())
    doc = json.loads(raw)
    assert list(doc) == ["architecture", "config", "created", "history", "os", "rootfs"]
    assert list(doc["config"]) == ["User", "Env", "Cmd", "WorkingDir", "Labels"]
    assert list(doc["config"]["Labels"]) == ["a", "z"]
    assert list(doc["rootfs"]) == ["type", "diff_ids"]
    assert list(doc["history"][0]) == ["created", "created_by", "comment"]
    assert list(doc["history"][1]) == ["created", "created_by", "empty_layer"]
    assert b"\\u003e b \\u0026\\u0026" in raw
    assert b" " not in raw.split(b'"Cmd"')[0]  # compact


def test_manifest_is_indented_go_json_in_struct_order(tmp_path: Path) -> None:
    layer = LayerBlob(
        Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", BLOB, 123), tmp_path
    )
    image = build_image(sample_config(), [layer], oci_mediatypes=True)
    cfg = image.config_digest
    assert image.manifest.decode() == (
        "{\n"
        '  "schemaVersion": 2,\n'
        '  "mediaType": "application/vnd.oci.image.manifest.v1+json",\n'
        '  "config": {\n'
        '    "mediaType": "application/vnd.oci.image.config.v1+json",\n'
        f'    "digest": "{cfg}",\n'
        f'    "size": {len(image.config)}\n'
        "  },\n"
        '  "layers": [\n'
        "    {\n"
        '      "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",\n'
        f'      "digest": "{BLOB}",\n'
        '      "size": 123\n'
        "    }\n"
        "  ]\n"
        "}"
    )


def test_docker_media_types_convert_layers(tmp_path: Path) -> None:
    layer = LayerBlob(Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", BLOB, 1), tmp_path)
    doc = build_image(sample_config(), [layer], oci_mediatypes=False).manifest_doc
    assert doc["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert doc["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert doc["layers"][0]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"


def test_layers_must_match_diff_ids(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="diff_ids"):
        build_image(sample_config(), [], oci_mediatypes=True)


def test_layout_index_names_the_image_like_containerd(tmp_path: Path) -> None:
    layer = LayerBlob(Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", BLOB, 1), tmp_path)
    image = build_image(sample_config(), [layer], oci_mediatypes=True)
    doc = json.loads(layout_index(image, ["hello:1"], created="2024-01-01T00:00:00Z"))
    assert doc["schemaVersion"] == 2
    (entry,) = doc["manifests"]
    assert entry["digest"] == image.manifest_digest
    assert entry["size"] == len(image.manifest)
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    assert entry["annotations"] == {
        "io.containerd.image.name": "docker.io/library/hello:1",
        "org.opencontainers.image.created": "2024-01-01T00:00:00Z",
        "org.opencontainers.image.ref.name": "1",
    }


@pytest.mark.parametrize(
    ("name", "full", "familiar", "ref"),
    [
        ("hello", "docker.io/library/hello:latest", "hello:latest", "latest"),
        ("hello:1", "docker.io/library/hello:1", "hello:1", "1"),
        ("me/app:2", "docker.io/me/app:2", "me/app:2", "2"),
        ("localhost:5000/a/b", "localhost:5000/a/b:latest", "localhost:5000/a/b:latest", "latest"),
        ("ghcr.io/o/r:t", "ghcr.io/o/r:t", "ghcr.io/o/r:t", "t"),
    ],
)
def test_image_names(name: str, full: str, familiar: str, ref: str) -> None:
    assert normalize_name(name) == full
    assert familiar_name(name) == familiar
    assert ref_name(name) == ref
