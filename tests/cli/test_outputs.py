"""Outputs through the real CLI: several -o, --load, media types, compression, annotations,
metadata, -q, the blob cache, --squash and writing to a closed pipe."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from clitools import DOCKBUILD, DockbuildCLI, require_docker, write_context

DOCKERFILE = """\
FROM busybox
RUN echo one > /one.txt && mkdir -p /etc/app && echo conf > /etc/app/conf
RUN rm /etc/app/conf && rm -f /bin/vi && echo two > /two.txt
COPY data.bin /data.bin
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    ctx = write_context(tmp_path / "app", {"Dockerfile": DOCKERFILE})
    (ctx / "data.bin").write_bytes(os.urandom(50_000) + b"z" * 200_000)
    return ctx


def _tar(data: bytes) -> tarfile.TarFile:
    return tarfile.open(fileobj=io.BytesIO(data))  # noqa: SIM115 - in memory


def oci_image(archive: Path) -> tuple[dict, dict, dict, dict[str, bytes]]:
    """(index, manifest, config, blobs by digest) of the single image in an OCI tar."""
    outer = _tar(archive.read_bytes())
    blobs = {
        "sha256:" + m.name.rsplit("/", 1)[1]: outer.extractfile(m).read()  # type: ignore[union-attr]
        for m in outer.getmembers()
        if m.name.startswith("blobs/sha256/") and m.isfile()
    }
    index = json.loads(outer.extractfile("index.json").read())  # type: ignore[union-attr]
    manifest = json.loads(blobs[index["manifests"][0]["digest"]])
    config = json.loads(blobs[manifest["config"]["digest"]])
    return index, manifest, config, blobs


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(command), capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done


def test_several_outputs_in_one_build_are_the_same_image(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    oci, docker, meta = tmp_path / "i.tar", tmp_path / "d.tar", tmp_path / "meta.json"
    rootfs = tmp_path / "rootfs"
    dockbuild.build(
        app, "-t", "multi:1", "-o", f"type=oci,dest={oci}", "-o", f"type=docker,dest={docker}",
        "-o", f"type=local,dest={rootfs}", "--metadata-file", str(meta),
    )  # fmt: skip
    metadata = json.loads(meta.read_text())
    for archive in (oci, docker):
        index, manifest, _, _ = oci_image(archive)
        assert index["manifests"][0]["digest"] == metadata["containerimage.digest"]
        assert manifest["config"]["digest"] == metadata["containerimage.config.digest"]
    assert (rootfs / "two.txt").read_text() == "two\n"
    assert metadata["image.name"] == "docker.io/library/multi:1"
    assert metadata["containerimage.descriptor"]["digest"] == metadata["containerimage.digest"]
    assert metadata["containerimage.descriptor"]["mediaType"] == (
        "application/vnd.oci.image.manifest.v1+json"
    )


def test_quiet_prints_the_image_id_and_iidfile_holds_it(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    iid = tmp_path / "iid"
    out = tmp_path / "o.tar"
    run = dockbuild(*dockbuild.base_context, "-q", "--iidfile", str(iid),
                    "-o", f"type=oci,dest={out}", str(app))  # fmt: skip
    _, manifest, _, _ = oci_image(out)
    assert run.out.strip() == manifest["config"]["digest"] == iid.read_text()
    assert run.stderr == ""


@pytest.mark.docker
def test_load_puts_the_image_into_docker(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    require_docker()
    tag = f"dockbuild-load-test:{os.getpid()}"
    iid = tmp_path / "iid"
    try:
        dockbuild.build(app, "-t", tag, "--load", "--iidfile", str(iid))
        inspected = json.loads(_run("docker", "image", "inspect", tag).stdout)[0]
        assert inspected["Id"] == iid.read_text()
        run = _run("docker", "run", "--rm", tag, "cat", "/one.txt", "/two.txt")
        assert run.stdout == "one\ntwo\n"
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)


def test_docker_tarball_loads_into_podman(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    out = tmp_path / "d.tar"
    tag = f"localhost/dockbuild-podman-test:{os.getpid()}"
    runroot = tempfile.mkdtemp(prefix="dbpod", dir="/tmp")  # podman wants < 50 characters
    storage = ["--root", str(tmp_path / "podman-root"), "--runroot", runroot,
               "--storage-driver", "vfs"]  # fmt: skip
    iid = tmp_path / "iid"
    try:
        dockbuild.build(app, "-t", tag, "-o", f"type=docker,dest={out}", "--iidfile", str(iid))
        loaded = _run("podman", *storage, "load", "-i", str(out))
        assert tag in loaded.stdout
        info = json.loads(_run("podman", *storage, "image", "inspect", tag).stdout)[0]
        assert "sha256:" + info["Id"] == iid.read_text()
    finally:
        shutil.rmtree(runroot, ignore_errors=True)
        shutil.rmtree(tmp_path / "podman-root", ignore_errors=True)


def test_oci_directory_passes_skopeo_and_umoci(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    dockbuild.build(app, "-t", "umoci:v1", "-o", f"type=oci,tar=false,dest={layout}")
    _run("skopeo", "inspect", f"oci:{layout}:v1")
    bundle = tmp_path / "bundle"
    _run("umoci", "unpack", "--image", f"{layout}:v1", str(bundle))
    assert (bundle / "rootfs" / "two.txt").read_text() == "two\n"
    assert not (bundle / "rootfs" / "etc" / "app" / "conf").exists()
    # On the cache's filesystem the layers are hard links to the cache's blobs: no copy.
    index = json.loads((layout / "index.json").read_text())
    manifest_hex = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_hex).read_text())
    for layer in manifest["layers"]:
        hexpart = layer["digest"].split(":")[1]
        cached = dockbuild.root / "blobs" / "sha256" / hexpart
        assert (layout / "blobs" / "sha256" / hexpart).stat().st_ino == cached.stat().st_ino


def test_oci_directory_on_another_filesystem_gets_copies(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    with _tmpfs(tmp_path / "other", "64m") as other:
        layout = other / "layout"
        dockbuild.build(app, "-t", "copied:v1", "-o", f"type=oci,tar=false,dest={layout}")
        _run("skopeo", "inspect", f"oci:{layout}:v1")
        blobs = list((layout / "blobs" / "sha256").iterdir())
        assert len(blobs) == 6  # 4 layers, config, manifest
        assert all(b.stat().st_nlink == 1 for b in blobs)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (made), for the test's duration; root only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)  # even if still busy


def test_oci_mediatypes_false_writes_docker_media_types(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    out = tmp_path / "d.tar"
    dockbuild.build(app, "-o", f"type=oci,dest={out},oci-mediatypes=false")
    _, manifest, _, _ = oci_image(out)
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert {layer["mediaType"] for layer in manifest["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }


@pytest.mark.parametrize(
    ("options", "media_type", "magic"),
    [
        ("compression=zstd", "application/vnd.oci.image.layer.v1.tar+zstd", b"\x28\xb5\x2f\xfd"),
        ("compression=uncompressed", "application/vnd.oci.image.layer.v1.tar", None),
        ("compression=gzip,compression-level=9", "application/vnd.oci.image.layer.v1.tar+gzip",
         b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"),
    ],
)  # fmt: skip
def test_compression_of_new_layers(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path, options: str, media_type: str, magic: bytes
) -> None:
    out = tmp_path / "o.tar"
    dockbuild.build(app, "-o", f"type=oci,dest={out},{options}")
    _, manifest, config, blobs = oci_image(out)
    base, *own = manifest["layers"]
    # The base image's layer keeps the blob it came with (force-compression=false).
    assert base["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    for layer in own:
        assert layer["mediaType"] == media_type
        if magic:
            assert blobs[layer["digest"]].startswith(magic)
        else:
            assert layer["digest"] in config["rootfs"]["diff_ids"]


def test_force_compression_recompresses_the_base_layer(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.tar"
    dockbuild.build(app, "-o", f"type=oci,dest={out},compression=zstd,force-compression=true")
    _, manifest, config, _ = oci_image(out)
    assert {x["mediaType"] for x in manifest["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    }
    _run("skopeo", "inspect", f"oci-archive:{out}")
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])


def test_annotations_go_where_buildkit_puts_them(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.tar"
    dockbuild.build(
        app, "-t", "ann:1", "-o",
        f"type=oci,dest={out},annotation.org.example.a=1,"
        "annotation-manifest-descriptor.org.example.b=2,"
        "annotation-manifest[linux/amd64].org.example.c=3,"
        "annotation-manifest[linux/arm64].org.example.d=4",
    )  # fmt: skip
    index, manifest, _, _ = oci_image(out)
    assert manifest["annotations"] == {"org.example.a": "1", "org.example.c": "3"}
    assert index["manifests"][0]["annotations"]["org.example.b"] == "2"
    assert "annotations" not in index


def test_index_annotations_are_refused_for_a_single_platform_image(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    # One platform makes no image index: BuildKit's image writer refuses both forms.
    for key in ("annotation-index.org.example.e", "annotation-index-descriptor.org.example.f"):
        out = tmp_path / "o.tar"
        run = dockbuild.build(app, "-o", f"type=oci,dest={out},{key}=5", check=False)
        assert run.returncode == 2, key  # a usage error
        assert "index annotations not supported for single platform export" in run.stderr
        assert "Traceback" not in run.stderr and "#2" not in run.stderr  # before any step
        assert not out.exists()


def test_image_output_without_push_warns_that_nothing_keeps_it(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    meta = tmp_path / "meta.json"
    run = dockbuild.build(app, "-o", "type=image,name=kept:1", "--metadata-file", str(meta))
    assert "type=image without push=true keeps the image nowhere" in run.stderr
    assert "--push, --load" in run.stderr
    assert json.loads(meta.read_text())["containerimage.digest"].startswith("sha256:")


def test_image_output_with_store_false_is_kept_nowhere_without_a_warning(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    meta = tmp_path / "meta.json"
    run = dockbuild.build(app, "-o", "type=image,name=checked:1,store=false", "--metadata-file", str(meta))
    assert "WARNING" not in run.stderr
    assert json.loads(meta.read_text())["containerimage.digest"].startswith("sha256:")


def test_bad_output_options_are_clear_errors_before_building(
    dockbuild: DockbuildCLI, app: Path
) -> None:
    for option, message in [
        ("type=oci,dest=x,compression=lz4", "unsupported compression 'lz4'"),
        ("type=oci,dest=x,compression=estargz", "compression=estargz is not supported"),
        ("type=oci,dest=x,compression-level=30", "out of range"),
        ("type=oci,dest=x,colour=blue", "has no option 'colour'"),
        ("type=oci,dest=x,compression=zstd,oci-mediatypes=false", "needs OCI media types"),
        ("type=image,name=Bad:Name,push=true", "must be lowercase"),
    ]:
        run = dockbuild.build(app, "-o", option, check=False)
        assert run.returncode == 2, option  # a usage error
        assert message in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert "#2" not in run.stderr  # refused before any step ran


def test_a_second_export_compresses_nothing(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "1.tar", tmp_path / "2.tar"
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    one = dockbuild.build(app, "-o", f"type=oci,dest={first}", env=env)
    two = dockbuild.build(app, "-o", f"type=oci,dest={second}", env=env)
    assert "exporting layers" in one.stderr
    assert "exporting layers" not in two.stderr  # every blob came from the cache
    assert first.read_bytes() == second.read_bytes()


def test_squash_merges_the_build_layers_into_one(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    plain, squashed = tmp_path / "p.tar", tmp_path / "s.tar"
    dockbuild.build(app, "-o", f"type=oci,dest={plain}")
    dockbuild.build(app, "--squash", "-o", f"type=oci,dest={squashed}")
    _, plain_manifest, _, _ = oci_image(plain)
    _, manifest, config, blobs = oci_image(squashed)
    assert len(plain_manifest["layers"]) == 4
    assert len(manifest["layers"]) == 2  # busybox + everything the build added
    assert manifest["layers"][0] == plain_manifest["layers"][0]
    non_empty = [h for h in config["history"] if not h.get("empty_layer")]
    assert len(non_empty) == len(config["rootfs"]["diff_ids"]) == 2
    import gzip

    layer = _tar(gzip.decompress(blobs[manifest["layers"][1]["digest"]]))
    names = set(layer.getnames())
    assert {"one.txt", "two.txt", "data.bin", "bin/.wh.vi"} <= names
    assert "etc/app/conf" not in names  # made by one step, removed by the next
    # And the result unpacks to what the unsquashed image holds.
    bundle = tmp_path / "bundle"
    layout = tmp_path / "layout"
    layout.mkdir()
    with tarfile.open(squashed) as t:
        t.extractall(layout, filter="tar")
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0].setdefault("annotations", {})["org.opencontainers.image.ref.name"] = "s"
    (layout / "index.json").write_text(json.dumps(index))
    _run("umoci", "unpack", "--image", f"{layout}:s", str(bundle))
    rootfs = bundle / "rootfs"
    assert (rootfs / "one.txt").read_text() == "one\n"
    assert (rootfs / "etc" / "app").is_dir() and not (rootfs / "etc" / "app" / "conf").exists()
    assert not (rootfs / "bin" / "vi").exists() and (rootfs / "bin" / "sh").exists()


def test_writing_to_a_closed_pipe_ends_quietly_with_an_error_status(
    dockbuild: DockbuildCLI, app: Path
) -> None:
    shell = (
        f"{DOCKBUILD} --progress=quiet {' '.join(dockbuild.base_context)} {app} | head -c 10 "
        ">/dev/null; echo ${PIPESTATUS[0]} >&2"
    )
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True,
                          env=dockbuild.env(), check=False, timeout=300)  # fmt: skip
    status = int(done.stderr.strip().splitlines()[-1])
    assert status != 0
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_a_failed_export_leaves_the_previous_dest_and_no_temp_files(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    """A full disk in the middle of writing the archive: the old file stays as it was."""
    with _tmpfs(tmp_path / "small", "200k") as small:
        dest = small / "image.tar"
        dest.write_bytes(b"previous export")
        run = dockbuild.build(app, "-o", f"type=oci,dest={dest}", check=False)
        assert run.returncode == 1
        assert "no space left on device" in run.stderr and "Traceback" not in run.stderr
        assert dest.read_bytes() == b"previous export"
        assert [p.name for p in small.iterdir()] == ["image.tar"]


def test_an_unchanged_local_re_export_writes_nothing_and_restores_what_was_touched(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    app = write_context(tmp_path / "app", {
        "Dockerfile": "FROM busybox\nCOPY src/ /src/\nRUN echo made > /made\n",
        "src/a.txt": "a\n", "src/b.txt": "b\n",
    })  # fmt: skip
    out = tmp_path / "out"

    def export() -> str:
        return dockbuild.build(app, "-o", f"type=local,dest={out}").stderr

    def identity(path: Path) -> tuple[int, int]:
        st = os.lstat(path)
        return st.st_ino, st.st_ctime_ns

    export()
    before = {p: identity(p) for p in (out / "src" / "a.txt", out / "made", out / "bin")}
    (out / "mine.txt").write_text("the user's own\n")
    err = export()
    assert "nothing written" in err
    assert {p: identity(p) for p in before} == before  # not one file written again
    assert (out / "mine.txt").read_text() == "the user's own\n"
    # A file edited or removed in the destination is written again (the whole export).
    (out / "src" / "a.txt").write_text("edited\n")
    (out / "made").unlink()
    assert "nothing written" not in export()
    assert (out / "src" / "a.txt").read_text() == "a\n"
    assert (out / "made").read_text() == "made\n"
    assert (out / "mine.txt").read_text() == "the user's own\n"
    assert "nothing written" in export()
    # Another image into the same directory is written.
    (app / "src" / "b.txt").write_text("b2\n")
    assert "nothing written" not in export()
    assert (out / "src" / "b.txt").read_text() == "b2\n"
    # The same image into another directory is written there.
    other = tmp_path / "other"
    dockbuild.build(app, "-o", f"type=local,dest={other}")
    assert (other / "src" / "b.txt").read_text() == "b2\n"
