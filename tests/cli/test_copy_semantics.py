"""COPY and ADD as BuildKit does them, through the real CLI: one image built per module
from a context covering the acceptance cases (039 globs, 042 several sources, 033
WORKDIR-relative dests, 045 owners reset, 048 mtimes, 051 symlinks, 054 merging, 057/060
ADD, 117 unknown --chown names), plus --link, --parents, --exclude and --unpack."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from clitools import DockbuildCLI, read_oci, write_context

DOCKERFILE = """\
FROM busybox
ENV BASE=/srv
WORKDIR $BASE/app
COPY f.txt .
COPY f.txt rel/
COPY f.txt rel/renamed.txt
WORKDIR /
COPY *.txt /glob/
COPY file?.md /question/
COPY file[0-9].md /class/
COPY dir*/*.txt /nested-glob/
COPY nothing-matches-* /empty/
COPY a.txt b.txt /dest/
COPY ["a.txt", "b.txt", "/json-dest/"]
COPY owned.txt /owned.txt
COPY tree /tree/
COPY stamped.txt /stamped.txt
COPY link-to-file /followed
COPY v1/ /app/
COPY v2/ /app/
COPY --chown=ghost:ghost f.txt /ghost.txt
COPY --chown=user f.txt /user.txt
COPY --chown=1234:4321 f.txt /ids.txt
COPY --chmod=u=rwx,go=rx f.txt /sym-mode.txt
COPY --chmod=0600 f.txt /oct-mode.txt
ADD --chown=user:user owned.tar /t/
ADD packed.tar.gz /gz
ADD packed.tar.bz2 /bz2/
ADD packed.tar.xz /xz/
ADD --unpack=false packed.tar.gz /kept/
COPY packed.tar.gz /copied/
ADD --chown=1000:1000 dir1 /added-owned
COPY --exclude=*.md --exclude=sub src/ /excluded/
COPY --exclude=b.txt *.txt /glob-excluded/
COPY --parents src/./x/y/deep.txt /pivot/
COPY --parents src/x/y/deep.txt src/top.md /parents/
COPY --parents src/./**/*.md /md/
COPY --link f.txt /linked/
COPY hl /hl/
"""


def _tar(entries: list[tuple[str, bytes, int, int]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data, uid, gid in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.uid, info.gid = uid, gid
            info.mode = 0o640
            info.mtime = 1500000000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, busybox_layout: Path) -> Path:
    tmp = tmp_path_factory.mktemp("copy")
    ctx = write_context(
        tmp / "ctx",
        {
            "Dockerfile": DOCKERFILE,
            "f.txt": "f\n",
            "a.txt": "a\n",
            "b.txt": "b\n",
            "file1.md": "1",
            "file2.md": "2",
            "fileX.md": "X",
            "dir1/x.txt": "x",
            "dir1/y.md": "y",
            "dir2/y.txt": "y",
            "owned.txt": "owned\n",
            "tree/x.txt": "x\n",
            "tree/inner.txt": "inner\n",
            "stamped.txt": "stamped\n",
            "real.txt": "real\n",
            "v1/only1.txt": "1\n",
            "v1/both.txt": "v1\n",
            "v2/only2.txt": "2\n",
            "v2/both.txt": "v2\n",
            "src/top.md": "top\n",
            "src/keep.txt": "keep\n",
            "src/sub/s.txt": "s\n",
            "src/x/y/deep.txt": "deep\n",
            "src/x/y/deep.md": "deepmd\n",
        },
    )
    os.chown(ctx / "owned.txt", 1234, 4321)
    os.chown(ctx / "tree/x.txt", 77, 88)
    os.utime(ctx / "stamped.txt", (1234567890, 1234567890))
    os.utime(ctx / "tree/inner.txt", (1577836800, 1577836800))
    (ctx / "hl").mkdir()
    (ctx / "hl/one").write_text("same inode\n")
    os.link(ctx / "hl/one", ctx / "hl/two")
    (ctx / "link-to-file").symlink_to("real.txt")
    (ctx / "tree/rel-link").symlink_to("x.txt")
    (ctx / "tree/abs-link").symlink_to("/etc/passwd")
    (ctx / "tree/dangling").symlink_to("does-not-exist")
    (ctx / "owned.tar").write_bytes(_tar([("x.txt", b"x\n", 1234, 5678)]))
    packed = [("p/one.txt", b"one\n", 7, 8)]
    (ctx / "packed.tar.gz").write_bytes(_tar(packed, "w:gz"))
    (ctx / "packed.tar.bz2").write_bytes(_tar(packed, "w:bz2"))
    (ctx / "packed.tar.xz").write_bytes(_tar(packed, "w:xz"))
    cli = DockbuildCLI(tmp / "cache", busybox_layout)
    out = tmp / "out"
    cli.build(ctx, "-o", f"type=local,dest={out}")
    return out


def _names(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def test_relative_destinations_follow_workdir(image: Path) -> None:
    assert (image / "srv/app/f.txt").read_text() == "f\n"
    assert (image / "srv/app/rel/f.txt").read_text() == "f\n"
    assert (image / "srv/app/rel/renamed.txt").read_text() == "f\n"


def test_globs_follow_go_filepath_match(image: Path) -> None:
    assert _names(image / "glob") == ["a.txt", "b.txt", "f.txt", "owned.txt", "real.txt", "stamped.txt"]
    assert _names(image / "question") == ["file1.md", "file2.md", "fileX.md"]
    assert _names(image / "class") == ["file1.md", "file2.md"]
    assert _names(image / "nested-glob") == ["x.txt", "y.txt"]


def test_wildcard_matching_nothing_is_not_an_error(image: Path) -> None:
    assert not (image / "empty").exists() or _names(image / "empty") == []


def test_several_sources_land_in_the_directory(image: Path) -> None:
    assert _names(image / "dest") == ["a.txt", "b.txt"]
    assert _names(image / "json-dest") == ["a.txt", "b.txt"]


def test_context_owners_are_reset_to_root(image: Path) -> None:
    for path in ("owned.txt", "tree/x.txt"):
        st = os.lstat(image / path)
        assert (st.st_uid, st.st_gid) == (0, 0), path


def test_mtimes_are_kept(image: Path) -> None:
    assert os.lstat(image / "stamped.txt").st_mtime == 1234567890
    assert os.lstat(image / "tree/inner.txt").st_mtime == 1577836800


def test_named_symlink_is_followed_and_inner_symlinks_kept(image: Path) -> None:
    assert not (image / "followed").is_symlink()
    assert (image / "followed").read_text() == "real\n"
    assert os.readlink(image / "tree/rel-link") == "x.txt"
    assert os.readlink(image / "tree/abs-link") == "/etc/passwd"
    assert os.readlink(image / "tree/dangling") == "does-not-exist"


def test_directory_copies_merge(image: Path) -> None:
    assert _names(image / "app") == ["both.txt", "only1.txt", "only2.txt"]
    assert (image / "app/both.txt").read_text() == "v2\n"


def test_chown_names_resolve_in_destination_and_unknown_names_are_root(image: Path) -> None:
    def owner(p: str) -> tuple[int, int]:
        st = os.lstat(image / p)
        return st.st_uid, st.st_gid

    assert owner("ghost.txt") == (0, 0)
    assert owner("user.txt") == (1000, 1000)
    assert owner("ids.txt") == (1234, 4321)


def test_chmod_octal_and_symbolic(image: Path) -> None:
    assert os.lstat(image / "sym-mode.txt").st_mode & 0o7777 == 0o755
    assert os.lstat(image / "oct-mode.txt").st_mode & 0o7777 == 0o600


def test_add_extracts_local_archives_detected_by_content(image: Path) -> None:
    st = os.lstat(image / "t/x.txt")
    assert (st.st_uid, st.st_gid) == (1000, 1000)  # --chown applies to extracted files
    for dest in ("gz", "bz2", "xz"):
        one = image / dest / "p/one.txt"
        assert one.read_text() == "one\n", dest
        st = os.lstat(one)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777, st.st_mtime) == (7, 8, 0o640, 1500000000)


def test_unpack_false_and_copy_keep_archives_whole(image: Path) -> None:
    assert _names(image / "kept") == ["packed.tar.gz"]
    assert _names(image / "copied") == ["packed.tar.gz"]


def test_add_directory_with_chown(image: Path) -> None:
    assert _names(image / "added-owned") == ["x.txt", "y.md"]
    st = os.lstat(image / "added-owned/x.txt")
    assert (st.st_uid, st.st_gid) == (1000, 1000)


def test_exclude_patterns_are_relative_to_the_source(image: Path) -> None:
    assert _names(image / "excluded") == ["keep.txt", "x"]
    # as in .dockerignore, "*.md" matches at the top of the source only
    assert _names(image / "excluded/x/y") == ["deep.md", "deep.txt"]
    # a wildcard's matches are sources themselves: patterns apply below them, so b.txt
    # is copied (BuildKit's fsutil; moby/buildkit#5489)
    assert {"a.txt", "b.txt"} <= set(_names(image / "glob-excluded"))


def test_parents_keep_paths_below_the_pivot(image: Path) -> None:
    assert (image / "pivot/x/y/deep.txt").read_text() == "deep\n"
    assert not (image / "pivot/src").exists()
    assert (image / "parents/src/x/y/deep.txt").read_text() == "deep\n"
    assert (image / "parents/src/top.md").read_text() == "top\n"
    assert sorted(p.relative_to(image / "md").as_posix() for p in (image / "md").rglob("*.md")) == [
        "top.md",
        "x/y/deep.md",
    ]


def test_link_copies_into_its_own_layer(image: Path) -> None:
    assert (image / "linked/f.txt").read_text() == "f\n"


def test_hardlinks_within_a_copy_are_kept(image: Path) -> None:
    assert os.lstat(image / "hl/one").st_ino == os.lstat(image / "hl/two").st_ino


def _layers(oci_tar: Path) -> list[str]:
    return [layer["digest"] for layer in read_oci(oci_tar).manifest["layers"]]


def test_copy_link_layer_does_not_depend_on_earlier_steps(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM busybox\nARG V=1\nRUN echo $V > /v\nCOPY --link f.txt /app/\n",
        "f.txt": "f\n",
    })
    dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'one.tar'}")
    run = dockbuild.build(ctx, "--build-arg", "V=2", "-o", f"type=oci,dest={tmp_path / 'two.tar'}")
    one, two = _layers(tmp_path / "one.tar"), _layers(tmp_path / "two.tar")
    assert one[-2] != two[-2]  # the RUN layer changed...
    assert one[-1] == two[-1]  # ...the --link layer is the very same blob
    assert _vertex_lines(run.stderr, "COPY --link f.txt /app/")[-1] == "CACHED"


def _vertex_lines(progress: str, name: str) -> list[str]:
    """The lines plain progress printed for the vertex named ``name`` (found by its
    number: steps running in parallel interleave their lines)."""
    numbers = {
        line.split(" ", 1)[0] for line in progress.splitlines()
        if line.startswith("#") and line.split(" ", 1)[1:] and line.split(" ", 1)[1].endswith(name)
    }
    assert len(numbers) == 1, f"no single vertex named {name!r} in:\n{progress}"
    (number,) = numbers
    return [line.split(" ", 1)[1] for line in progress.splitlines() if line.split(" ", 1)[0] == number][1:]


def test_dockerignore_negation_and_explicit_copy_of_an_ignored_file(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    # acceptance cases 063 and 066
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM busybox\nCOPY . /ctx/\n",
        ".dockerignore": ".dockerignore\n*.md\n!README.md\ndocs\n!docs/keep.md\n",
        "CHANGES.md": "c", "README.md": "r", "docs/drop.md": "d", "docs/keep.md": "k", "docs/other.txt": "o",
        "secret.env": "s",
    })
    (ctx / ".dockerignore").write_text((ctx / ".dockerignore").read_text() + "secret.env\n")
    out = tmp_path / "out"
    dockbuild.build(ctx, "-o", f"type=local,dest={out}")
    assert _names(out / "ctx") == ["Dockerfile", "README.md", "docs"]
    assert _names(out / "ctx/docs") == ["keep.md"]
    (ctx / "Dockerfile").write_text("FROM busybox\nCOPY secret.env /secret.env\n")
    run = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'o2'}", check=False)
    assert run.returncode == 1
    assert "secret.env" in run.stderr and "Dockerfile:2" in run.stderr and "Traceback" not in run.stderr


def test_copy_link_chown_by_name_is_refused_numeric_ids_and_root_work(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    # As BuildKit (moby/buildkit#7134): a --link copy is made on scratch, where there is
    # no /etc/passwd to resolve a name in, so a name is an error, not a silent 0:0 or a
    # lookup in the stage below.
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM busybox\nCOPY --link --chown=user:user f.txt /app/\n",
        "f.txt": "f\n",
    })
    run = dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'no.tar'}", check=False)
    assert run.returncode == 1
    assert "--link" in run.stderr and "numeric ids" in run.stderr and "Dockerfile:2" in run.stderr
    assert "Traceback" not in run.stderr
    (ctx / "Dockerfile").write_text(
        "FROM busybox\n"
        "COPY --link --chown=1234:4321 f.txt /ids/\n"
        "COPY --link --chown=1234:root f.txt /root-group/\n"
        "COPY --link --chown=user --chmod=600 f.txt /with-chmod/\n"  # not a --link layer: resolved
    )
    dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'ok.tar'}")
    image = read_oci(tmp_path / "ok.tar")
    owners = {m.name: (m.uid, m.gid) for layer in image.layers[1:] for m in layer.getmembers() if m.isfile()}
    assert owners == {"ids/f.txt": (1234, 4321), "root-group/f.txt": (1234, 0), "with-chmod/f.txt": (1000, 1000)}


def test_rebuild_after_an_edit_gives_the_image_a_fresh_cache_gives(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    # The second build links the unchanged files from the first build's layer: its
    # image must be exactly what a build in an empty cache makes.
    files = {f"d{i % 3}/f{i}.txt": f"file {i}\n" for i in range(30)}
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nCOPY . /app/\n", **files})
    for name in files:
        os.utime(ctx / name, (1500000000, 1500000000))
    os.chmod(ctx / "d1/f1.txt", 0o755)
    dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'one.tar'}")
    (ctx / "d2/f2.txt").write_text("edited\n")
    os.utime(ctx / "d2/f2.txt", (1500000000, 1500000000))
    os.chmod(ctx / "d1/f1.txt", 0o700)
    dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'two.tar'}")
    fresh = DockbuildCLI(tmp_path / "fresh-cache", dockbuild.busybox)
    fresh.build(ctx, "-o", f"type=oci,dest={tmp_path / 'fresh.tar'}")
    assert _layers(tmp_path / "two.tar") == _layers(tmp_path / "fresh.tar")
    two = read_oci(tmp_path / "two.tar")
    members = {m.name: m for m in two.layers[-1].getmembers()}
    assert two.layers[-1].extractfile(members["app/d2/f2.txt"]).read() == b"edited\n"  # type: ignore[union-attr]
    assert members["app/d1/f1.txt"].mode == 0o700
    assert _layers(tmp_path / "one.tar")[-1] != _layers(tmp_path / "two.tar")[-1]
