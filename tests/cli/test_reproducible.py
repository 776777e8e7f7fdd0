"""Reproducible images through the real CLI: SOURCE_DATE_EPOCH and rewrite-timestamp."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest
from clitools import DockbuildCLI, read_oci, write_context

EPOCH = 1700000000
EPOCH_TEXT = "2023-11-14T22:13:20Z"

DOCKERFILE = """\
FROM busybox
RUN echo built > /built.txt && mkdir /made && echo x > /made/now
COPY src/ /src/
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return write_context(tmp_path / "app", {"Dockerfile": DOCKERFILE, "src/a.txt": "a\n"})


def _image(archive: Path) -> tuple[str, dict, list[bytes]]:
    with tarfile.open(archive) as outer:
        index = json.loads(outer.extractfile("index.json").read())  # type: ignore[union-attr]

        def blob(digest: str) -> bytes:
            return outer.extractfile("blobs/sha256/" + digest[7:]).read()  # type: ignore[union-attr]

        digest = index["manifests"][0]["digest"]
        manifest = json.loads(blob(digest))
        config = json.loads(blob(manifest["config"]["digest"]))
        layers = [blob(layer["digest"]) for layer in manifest["layers"]]
    return digest, config, layers


def _build_twice(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path, output: str, env: dict[str, str],
    *args: str,
) -> tuple[Path, Path]:  # fmt: skip
    """Two builds of the same context, a second apart, in two different cache roots."""
    first, second = tmp_path / "first.tar", tmp_path / "second.tar"
    dockbuild.build(app, *args, "-o", f"{output},dest={first}",
                    env={**env, "DOCKBUILD_ROOT": str(tmp_path / "root1")})  # fmt: skip
    time.sleep(1.1)  # RUN writes files with a later time in the second build
    dockbuild.build(app, *args, "-o", f"{output},dest={second}",
                    env={**env, "DOCKBUILD_ROOT": str(tmp_path / "root2")})  # fmt: skip
    return first, second


def test_source_date_epoch_from_the_environment_gives_identical_oci_tars(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    first, second = _build_twice(dockbuild, app, tmp_path, "type=oci,rewrite-timestamp=true",
                                 {"SOURCE_DATE_EPOCH": str(EPOCH)})  # fmt: skip
    assert first.read_bytes() == second.read_bytes()
    _, config, layers = _image(first)
    assert config["created"] == EPOCH_TEXT
    own = [h for h in config["history"] if h.get("comment") == "buildkit.dockerfile.v0"]
    assert own and all(h["created"] == EPOCH_TEXT for h in own)
    import gzip

    # New layers have their file times clamped to the epoch.
    for blob in layers[1:]:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as layer:
            assert all(m.mtime <= EPOCH for m in layer.getmembers())


def test_source_date_epoch_as_a_build_arg_gives_identical_digests(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    first, second = _build_twice(
        dockbuild, app, tmp_path, "type=docker,rewrite-timestamp=true", {},
        "--build-arg", f"SOURCE_DATE_EPOCH={EPOCH}", "-t", "repro:1",
    )  # fmt: skip
    assert _image(first)[0] == _image(second)[0]
    assert first.read_bytes() == second.read_bytes()


def test_without_rewrite_timestamp_new_files_keep_their_times(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    """The epoch alone fixes `created`, not the files RUN wrote (as in BuildKit)."""
    first, second = _build_twice(dockbuild, app, tmp_path, "type=oci",
                                 {"SOURCE_DATE_EPOCH": str(EPOCH)})  # fmt: skip
    one, two = _image(first), _image(second)
    assert one[1]["created"] == two[1]["created"] == EPOCH_TEXT
    assert one[0] != two[0]


def test_a_bad_source_date_epoch_is_a_clear_error(dockbuild: DockbuildCLI, app: Path) -> None:
    run = dockbuild.build(app, "--build-arg", "SOURCE_DATE_EPOCH=yesterday", check=False)
    assert run.returncode == 1
    assert "invalid SOURCE_DATE_EPOCH" in run.stderr and "Traceback" not in run.stderr


# Same inputs, same image: a rebuild from the cache keeps every history time (each entry's
# is when its layer was made), so --iidfile names the same image on every `make`.

SAME_IMAGE = """\
FROM busybox
RUN echo built > /built.txt
ENV STEP=2
COPY src/ /src/
LABEL last=1
"""


def _iid(dockbuild: DockbuildCLI, app: Path, iid: Path, *args: str) -> str:
    dockbuild.build(app, "--iidfile", str(iid), *args)
    return iid.read_text()


def test_a_cached_rebuild_a_second_later_gives_the_same_image_id(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    app = write_context(tmp_path / "same", {"Dockerfile": SAME_IMAGE, "src/a.txt": "a\n"})
    first = _iid(dockbuild, app, tmp_path / "iid1")
    time.sleep(1.1)
    assert _iid(dockbuild, app, tmp_path / "iid2") == first
    out = tmp_path / "image.tar"
    dockbuild.build(app, "-o", f"type=oci,dest={out}")
    config = read_oci(out).config
    own = config["history"][-4:]
    # A metadata-only entry takes the time of the layer before it; the config the last one.
    assert own[1]["created"] == own[0]["created"] <= own[2]["created"] == own[3]["created"]
    assert config["created"] == own[3]["created"]
    # A step that runs again makes a new layer, with its own time.
    time.sleep(1.1)
    assert _iid(dockbuild, app, tmp_path / "iid3", "--no-cache") != first


def test_source_date_epoch_still_sets_every_time_of_a_cached_rebuild(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    app = write_context(tmp_path / "same", {"Dockerfile": SAME_IMAGE, "src/a.txt": "a\n"})
    plain = _iid(dockbuild, app, tmp_path / "iid1")
    pinned = _iid(dockbuild, app, tmp_path / "iid2", "--build-arg", f"SOURCE_DATE_EPOCH={EPOCH}")
    assert pinned != plain
    out = tmp_path / "image.tar"
    dockbuild.build(app, "--build-arg", f"SOURCE_DATE_EPOCH={EPOCH}", "-o", f"type=oci,dest={out}")
    config = read_oci(out).config
    assert config["created"] == EPOCH_TEXT
    assert all(h["created"] == EPOCH_TEXT for h in config["history"][-4:])


def test_three_concurrent_builds_on_one_cache_root_give_one_image_id(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    import subprocess

    from clitools import DOCKBUILD

    app = write_context(tmp_path / "same", {"Dockerfile": SAME_IMAGE, "src/a.txt": "a\n"})
    procs = [
        subprocess.Popen(
            [DOCKBUILD, "--progress=plain", *dockbuild.base_context,
             "--iidfile", str(tmp_path / f"iid{n}"), str(app)],
            env=dockbuild.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        for n in range(3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    ids = {(tmp_path / f"iid{n}").read_text() for n in range(3)}
    assert len(ids) == 1
    time.sleep(1.1)
    assert _iid(dockbuild, app, tmp_path / "again") in ids
