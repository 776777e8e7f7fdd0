"""The build-level result record (docs/cache.md, "The result record"), through the real CLI.

A rebuild with nothing changed goes straight to the outputs: the frontend and the solver
are never imported (seen with ``python -X importtime``). Every change that decides the
result misses the record: its output is then byte-identical to a ``--no-cache`` build's
(file times pinned with SOURCE_DATE_EPOCH and rewrite-timestamp, so two builds of the
same inputs give the same bytes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from clitools import DockbuildCLI, write_context

EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}

DOCKERFILE = """\
FROM busybox
ARG FLAVOR=plain
RUN echo "$FLAVOR" > /flavor
COPY src/ /src/
COPY --from=extra . /extra/
LABEL made=here
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    files = {"Dockerfile": DOCKERFILE, ".dockerignore": "src/ignored*\n"}
    files.update({f"src/f{i:02}.txt": f"file {i}\n" for i in range(30)})
    files["src/ignored.txt"] = "never copied\n"
    return write_context(tmp_path / "app", files)


@pytest.fixture
def extra(tmp_path: Path) -> Path:
    return write_context(tmp_path / "extra", {"e.txt": "extra\n"})


class Builds:
    """Builds of one app into numbered OCI tars, each telling whether it used the record."""

    def __init__(self, dockbuild: DockbuildCLI, app: Path, extra: Path, tmp_path: Path) -> None:
        self.dockbuild, self.app, self.extra, self.tmp = dockbuild, app, extra, tmp_path
        self.count = 0
        self.env = dict(EPOCH)

    def __call__(self, *args: str) -> tuple[bytes, bool]:
        """The output's bytes, and whether the build was served from the record."""
        self.count += 1
        out = self.tmp / f"out{self.count}.tar"
        cmd = [
            sys.executable, "-X", "importtime", "-m", "dockbuild", "--progress=plain",
            *self.dockbuild.base_context, "--build-context", f"extra={self.extra}",
            "-o", f"type=oci,rewrite-timestamp=true,dest={out}", *args, str(self.app),
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=self.dockbuild.env(self.env), capture_output=True, timeout=300)
        err = proc.stderr.decode()
        assert proc.returncode == 0, err
        return out.read_bytes(), "dockbuild.frontend.convert" not in err

    def changed(self, *args: str) -> bytes:
        """A build after a change: it misses the record, and gives what --no-cache gives;
        the build after it is served from the new record."""
        data, served = self(*args)
        assert not served
        fresh, _ = self("--no-cache", *args)
        assert data == fresh
        again, served = self(*args)
        assert served and again == data
        return data


@pytest.fixture
def builds(dockbuild: DockbuildCLI, app: Path, extra: Path, tmp_path: Path) -> Builds:
    b = Builds(dockbuild, app, extra, tmp_path)
    first, served = b()
    assert not served
    again, served = b()
    assert served and again == first  # nothing changed: the outputs only
    return b


def test_an_unchanged_rebuild_shows_its_steps_cached_and_writes_the_same_image(
    dockbuild: DockbuildCLI, app: Path, extra: Path, tmp_path: Path
) -> None:
    def build(n: int, output: str) -> str:
        iid = tmp_path / f"iid{n}"
        run = dockbuild.build(app, "--build-context", f"extra={extra}", "--iidfile", str(iid),
                              "-o", f"{output},dest={tmp_path / f'out{n}'}")  # fmt: skip
        assert iid.read_text().startswith("sha256:")
        return run.stderr

    build(1, "type=oci")
    err = build(2, "type=oci")
    assert "#2 CACHED" in err and 'RUN echo "$FLAVOR" > /flavor\n#3 CACHED' in err, err
    assert (tmp_path / "iid1").read_text() == (tmp_path / "iid2").read_text()
    assert (tmp_path / "out1").read_bytes() == (tmp_path / "out2").read_bytes()
    build(3, "type=docker")
    local = tmp_path / "local"
    dockbuild.build(app, "--build-context", f"extra={extra}", "-o", f"type=local,dest={local}")
    assert (local / "src" / "f29.txt").read_text() == "file 29\n"
    assert not (local / "src" / "ignored.txt").exists()
    assert (local / "extra" / "e.txt").read_text() == "extra\n"


def test_a_changed_context_file_misses(builds: Builds, app: Path) -> None:
    (app / "src" / "f07.txt").write_text("changed\n")
    builds.changed()


def test_a_new_context_file_misses(builds: Builds, app: Path) -> None:
    (app / "src" / "new.txt").write_text("new\n")
    builds.changed()


def test_a_changed_dockerignore_misses(builds: Builds, app: Path) -> None:
    (app / ".dockerignore").write_text("src/f0*\n")
    builds.changed()


def test_a_changed_dockerfile_misses(builds: Builds, app: Path) -> None:
    (app / "Dockerfile").write_text(DOCKERFILE + "ENV MORE=1\n")
    builds.changed()


def test_a_changed_named_context_misses(builds: Builds, extra: Path) -> None:
    (extra / "e.txt").write_text("other\n")
    builds.changed()


def test_a_changed_build_arg_misses(builds: Builds) -> None:
    builds.changed("--build-arg", "FLAVOR=spicy")


def test_a_build_arg_from_the_environment_misses_when_the_variable_changes(builds: Builds) -> None:
    builds.env["FLAVOR"] = "sweet"
    builds.changed("--build-arg", "FLAVOR")
    builds.env["FLAVOR"] = "sour"
    builds.changed("--build-arg", "FLAVOR")


def test_a_changed_source_date_epoch_misses(builds: Builds) -> None:
    builds.env["SOURCE_DATE_EPOCH"] = "1600000000"
    builds.changed()


def test_a_changed_secret_id_misses(builds: Builds, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret")
    builds.changed("--secret", f"id=token,src={tmp_path / 'token'}")
    builds.changed("--secret", f"id=other,src={tmp_path / 'token'}")
    # A secret's value is not part of the key (as in BuildKit): the same id is served.
    (tmp_path / "token").write_text("changed")
    _, served = builds("--secret", f"id=other,src={tmp_path / 'token'}")
    assert served


def test_an_edited_config_file_misses(builds: Builds, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[gc]\nenabled = true\n")
    builds.env["DOCKBUILD_CONFIG"] = str(config)
    builds.changed()
    config.write_text("[gc]\nenabled = false\n")
    builds.changed()


def test_no_cache_bypasses_the_record(builds: Builds) -> None:
    _, served = builds("--no-cache")
    assert not served


def test_a_pruned_cache_misses(builds: Builds, dockbuild: DockbuildCLI) -> None:
    dockbuild("prune", "--all", "--force")
    data, served = builds()
    assert not served
    fresh, _ = builds("--no-cache")
    assert data == fresh


def test_a_build_without_an_output_says_it_is_cached(
    dockbuild: DockbuildCLI, app: Path, extra: Path
) -> None:
    import os

    from clitools import DOCKBUILD

    def on_a_terminal() -> str:
        """A build with stdout on a terminal: no output is written."""
        main, side = os.openpty()
        try:
            proc = subprocess.run(
                [DOCKBUILD, "--progress=plain", *dockbuild.base_context,
                 "--build-context", f"extra={extra}", str(app)],
                env=dockbuild.env(), stdout=side, stderr=subprocess.PIPE, timeout=300,
            )  # fmt: skip
        finally:
            os.close(side)
            os.close(main)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stderr.decode()

    first = on_a_terminal()
    again = on_a_terminal()
    for err in (first, again):
        assert "Build result kept in the cache (no output requested)" in err
    assert 'RUN echo "$FLAVOR" > /flavor\n#3 CACHED' in again


def test_a_base_tag_moved_is_seen_with_pull_only(
    dockbuild: DockbuildCLI, tmp_path: Path, registry, busybox_layout: Path  # type: ignore[no-untyped-def]
) -> None:
    base = f"{registry.host}/record/base:latest"
    registry.push_layout(busybox_layout, "record/base:latest")
    app = write_context(tmp_path / "app", {"Dockerfile": f"FROM {base}\nRUN echo app > /app\n"})
    builds = Builds(dockbuild, app, tmp_path / "extra", tmp_path)
    (tmp_path / "extra").mkdir()
    first, served = builds()
    assert not served
    newer = write_context(tmp_path / "newer", {"Dockerfile": "FROM busybox\nRUN echo newer > /newer\n"})
    dockbuild.build(newer, "-t", base, "--push")  # the tag now names another image
    # Without --pull a tag resolves once (docs/migrating.md): the same image, from the record.
    again, served = builds()
    assert served and again == first
    pulled, served = builds("--pull")
    assert not served and pulled != first
    fresh, _ = builds("--pull", "--no-cache")
    assert fresh == pulled
    after, served = builds()
    assert served and after == pulled


def test_a_build_served_from_the_record_marks_its_steps_used(builds: Builds, dockbuild: DockbuildCLI) -> None:
    """Garbage collection keeps what is used: a step served through the result record
    counts as used, as it does in a step-by-step cached build."""
    import time

    time.sleep(2.5)
    stale = dockbuild("du", "--filter", "until=2s").out
    assert "echo" in stale, stale  # the RUN step's record, unused for 2.5 s
    _, served = builds()
    assert served
    fresh = dockbuild("du", "--filter", "until=2s").out
    assert "echo" not in fresh and "src/" not in fresh, fresh


def test_changed_dockbuild_code_misses(builds: Builds) -> None:
    """An editable install runs new code under the same version: a source file of
    dockbuild with a new mtime keys new results."""
    import os

    import dockbuild.llb

    source = Path(dockbuild.llb.__file__)
    st = source.stat()
    try:
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        _, served = builds()
        assert not served
    finally:
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    _, served = builds()
    assert served  # the same code as the first build's: its record answers again


def _rows(root: Path, table: str) -> list[tuple[str, ...]]:
    import sqlite3

    conn = sqlite3.connect(root / "db.sqlite")
    try:
        return conn.execute(f"SELECT * FROM {table}").fetchall()
    finally:
        conn.close()


def test_prune_drops_the_result_records_it_left_without_layers(builds: Builds, dockbuild: DockbuildCLI) -> None:
    assert len(_rows(dockbuild.root, "results")) == 1
    dockbuild("prune", "--force", "--filter", "type==regular")  # the steps' layers go, the base stays
    assert _rows(dockbuild.root, "results") == []
    data, served = builds()
    assert not served
    assert len(_rows(dockbuild.root, "results")) == 1


def test_prune_keeps_result_records_whose_layers_it_kept(builds: Builds, dockbuild: DockbuildCLI) -> None:
    dockbuild("prune", "--force", "--keep-duration", "1h")  # everything was used just now
    assert len(_rows(dockbuild.root, "results")) == 1
    _, served = builds()
    assert served


def test_prune_drops_the_records_of_local_exports_whose_directory_is_gone(
    dockbuild: DockbuildCLI, app: Path, extra: Path, tmp_path: Path
) -> None:
    import shutil

    kept, gone = tmp_path / "kept", tmp_path / "gone"
    for dest in (kept, gone):
        dockbuild.build(app, "--build-context", f"extra={extra}", "-o", f"type=local,dest={dest}")
    assert {row[0] for row in _rows(dockbuild.root, "local_exports")} == {str(kept), str(gone)}
    shutil.rmtree(gone)
    dockbuild("prune", "--force", "--keep-duration", "1h")
    assert [row[0] for row in _rows(dockbuild.root, "local_exports")] == [str(kept)]
    dockbuild("prune", "--all", "--force")
    assert _rows(dockbuild.root, "local_exports") == []
    assert _rows(dockbuild.root, "results") == []
