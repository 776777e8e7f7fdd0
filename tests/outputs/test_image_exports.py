"""The oci and docker exporters: layouts and tarballs that real tools accept."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from dockbuild.engine.archive import write_layer_tar
from dockbuild.engine.compression import compress, layer_media_type
from dockbuild.outputs.docker import docker_manifest_json, export_docker
from dockbuild.outputs.image import Descriptor, ImageBlobs, LayerBlob, build_image
from dockbuild.outputs.oci import export_oci


def fabricate(tmp_path: Path, *, oci: bool) -> ImageBlobs:
    """A one-layer image built the way the engine builds one."""
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "hello.txt").write_text("hello from dockbuild\n")
    (layer / "random.bin").write_bytes(os.urandom(300_000))  # more than a pipe buffer
    for p in [layer, *layer.rglob("*")]:
        os.utime(p, (1_700_000_000, 1_700_000_000))
    tar = tmp_path / "layer.tar"
    with tar.open("wb") as f:
        write_layer_tar(layer, f)
    diff_id = "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest()
    store = tmp_path / "store" / "blobs" / "sha256"
    store.mkdir(parents=True)
    staged = tmp_path / "staged"
    digest, size = compress(tar, staged, "gzip")
    blob = store / digest.split(":")[1]
    staged.rename(blob)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [
            {
                "created": "2023-11-14T22:13:20Z",
                "created_by": "COPY . / # buildkit",
                "comment": "buildkit.dockerfile.v0",
            },
            {
                "created": "2023-11-14T22:13:20Z",
                "created_by": 'CMD ["/bin/sh"]',
                "comment": "buildkit.dockerfile.v0",
                "empty_layer": True,
            },
        ],
        "created": "2023-11-14T22:13:20Z",
    }
    descriptor = Descriptor(layer_media_type("gzip", oci), digest, size)
    return build_image(config, [LayerBlob(descriptor, blob)], oci_mediatypes=oci)


@pytest.fixture
def image(tmp_path: Path) -> ImageBlobs:
    return fabricate(tmp_path, oci=True)


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)


# --- oci -----------------------------------------------------------------------------------------


def test_oci_tar_layout_is_sorted_and_deterministic(image: ImageBlobs, tmp_path: Path) -> None:
    first, second = io.BytesIO(), io.BytesIO()
    export_oci(image, names=["hello:1"], out=first)
    export_oci(image, names=["hello:1"], out=second)
    assert first.getvalue() == second.getvalue()
    entries = members(first.getvalue())
    names = [m.name for m in entries]
    assert names == sorted(names)
    assert names[:2] == ["blobs", "blobs/sha256"]
    assert names[-2:] == ["index.json", "oci-layout"]
    assert {m.name.split("/")[-1] for m in entries if m.name.startswith("blobs/sha256/")} == {
        image.manifest_digest[7:],
        image.config_digest[7:],
        image.layers[0].hex,
    }
    for m in entries:
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 0)
        assert m.mode == (0o755 if m.isdir() else 0o644 if m.name == "index.json" else 0o444)


def test_oci_tar_file_passes_skopeo_inspect(image: ImageBlobs, tmp_path: Path) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    dest = tmp_path / "out" / "image.tar"
    dest.parent.mkdir()
    export_oci(image, names=["hello:1"], dest=dest)
    assert [p.name for p in dest.parent.iterdir()] == ["image.tar"]  # no temp left
    result = run("skopeo", "inspect", f"oci-archive:{dest}")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["Digest"] == image.manifest_digest
    assert info["Layers"] == [image.layers[0].digest]
    assert info["Architecture"] == "amd64"
    raw = run("skopeo", "inspect", "--raw", f"oci-archive:{dest}")
    assert raw.stdout.encode() == image.manifest


def test_oci_directory_unpacks_with_umoci(image: ImageBlobs, tmp_path: Path) -> None:
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed")
    layout = tmp_path / "layout"
    export_oci(image, names=["hello:1"], dest=layout, tar=False)
    assert json.loads((layout / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    bundle = tmp_path / "bundle"
    result = run("umoci", "unpack", "--image", f"{layout}:1", bundle)
    assert result.returncode == 0, result.stderr
    assert (bundle / "rootfs" / "etc" / "hello.txt").read_text() == "hello from dockbuild\n"


def test_oci_directory_replaces_an_existing_one(image: ImageBlobs, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "stale").write_text("old")
    export_oci(image, dest=layout, tar=False)
    assert sorted(p.name for p in layout.iterdir()) == ["blobs", "index.json", "oci-layout"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_oci_tar_replaces_an_existing_file_and_refuses_a_directory(
    image: ImageBlobs, tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / "image.tar"
    dest.write_bytes(b"an older export")
    keep = out_dir / "kept.tar"
    os.link(dest, keep)  # another name of the old file keeps the old bytes
    export_oci(image, names=["hello:1"], dest=dest)
    with tarfile.open(dest) as tar:
        assert "index.json" in tar.getnames()
    assert keep.read_bytes() == b"an older export"
    assert sorted(p.name for p in out_dir.iterdir()) == ["image.tar", "kept.tar"]

    folder = out_dir / "folder.tar"
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        export_oci(image, dest=folder)
    assert (folder / "inside").is_dir()
    assert sorted(p.name for p in out_dir.iterdir()) == ["folder.tar", "image.tar", "kept.tar"]


def test_interrupted_export_leaves_no_partial_dest(
    image: ImageBlobs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    calls = 0
    real_addfile = tarfile.TarFile.addfile

    def flaky_addfile(self: tarfile.TarFile, *args: object, **kw: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt
        real_addfile(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(tarfile.TarFile, "addfile", flaky_addfile)
    with pytest.raises(KeyboardInterrupt):
        export_oci(image, dest=out_dir / "image.tar")
    assert list(out_dir.iterdir()) == []


def test_closed_stdout_raises_broken_pipe(image: ImageBlobs) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "wb", buffering=0) as out, pytest.raises(BrokenPipeError):
        export_oci(image, out=out)


# --- docker --------------------------------------------------------------------------------------


@pytest.fixture
def docker_image(tmp_path: Path) -> ImageBlobs:
    return fabricate(tmp_path, oci=False)


def test_docker_tarball_is_an_oci_layout_with_manifest_json(docker_image: ImageBlobs) -> None:
    buf = io.BytesIO()
    export_docker(docker_image, names=["hello:1"], out=buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        names = tf.getnames()
        manifest = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
        index = json.loads(tf.extractfile("index.json").read())  # type: ignore[union-attr]
    assert {"oci-layout", "index.json", "manifest.json"} <= set(names)
    assert manifest == [
        {
            "Config": f"blobs/sha256/{docker_image.config_digest[7:]}",
            "RepoTags": ["hello:1"],
            "Layers": [f"blobs/sha256/{docker_image.layers[0].hex}"],
        }
    ]
    annotations = index["manifests"][0]["annotations"]
    assert annotations["io.containerd.image.name"] == "docker.io/library/hello:1"


def test_docker_manifest_json_without_names_has_null_tags(docker_image: ImageBlobs) -> None:
    assert b'"RepoTags":null' in docker_manifest_json(docker_image)


def test_podman_loads_the_docker_tarball(docker_image: ImageBlobs, tmp_path: Path) -> None:
    if shutil.which("podman") is None or os.geteuid() != 0:
        pytest.skip("needs podman, as root")
    tarball = tmp_path / "image.tar"
    export_docker(docker_image, names=["dockbuild-test/hello:1"], dest=tarball)
    runroot = Path(tempfile.mkdtemp(prefix="dbpod", dir="/tmp"))  # podman wants < 50 chars
    storage = ["--root", tmp_path / "podman-root", "--runroot", runroot]
    storage += ["--storage-driver", "vfs"]
    try:
        loaded = run("podman", *storage, "load", "-i", tarball)
        assert loaded.returncode == 0, loaded.stderr
        assert "docker.io/dockbuild-test/hello:1" in loaded.stdout
        inspect = run("podman", *storage, "image", "inspect", "docker.io/dockbuild-test/hello:1")
        assert inspect.returncode == 0, inspect.stderr
        info = json.loads(inspect.stdout)[0]
        assert info["Id"] == docker_image.config_digest[7:]
        assert info["Config"]["Cmd"] == ["/bin/sh"]
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return run("docker", "version", "--format", "{{.Server.Version}}").returncode == 0


@pytest.mark.docker
def test_docker_loads_the_docker_tarball(docker_image: ImageBlobs, tmp_path: Path) -> None:
    if not docker_available():
        if os.environ.get("DOCKBUILD_REQUIRE_DOCKER") == "1":
            pytest.fail("DOCKBUILD_REQUIRE_DOCKER=1 but no dockerd answers")
        pytest.skip("no dockerd answers (set DOCKBUILD_REQUIRE_DOCKER=1 to make this fail)")
    tarball = tmp_path / "image.tar"
    export_docker(docker_image, names=["dockbuild-test/hello:1"], dest=tarball)
    loaded = run("docker", "load", "-i", tarball)
    assert loaded.returncode == 0, loaded.stderr
    try:
        inspect = run("docker", "image", "inspect", "dockbuild-test/hello:1")
        assert inspect.returncode == 0, inspect.stderr
        info = json.loads(inspect.stdout)[0]
        assert info["Id"] in (docker_image.config_digest, docker_image.manifest_digest)
        assert info["RootFS"]["Layers"] == docker_image.config_doc["rootfs"]["diff_ids"]
    finally:
        run("docker", "rmi", "-f", "dockbuild-test/hello:1")
