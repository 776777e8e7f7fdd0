"""The local and tar exporters: the merged rootfs of a snapshot, written out."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from dockbuild.engine.archive import OPAQUE_XATTR_ROOT
from dockbuild.engine.snapshots import Snapshot
from dockbuild.outputs.local import export_local
from dockbuild.outputs.tar import export_tar

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (whiteouts, owners)")


@pytest.fixture
def snapshot(tmp_path: Path) -> Snapshot:
    """Base layer with files; an upper layer deleting one, hiding a dir, adding others."""
    low, up = tmp_path / "low", tmp_path / "up"
    (low / "etc").mkdir(parents=True)
    (low / "etc" / "keep").write_text("keep")
    (low / "etc" / "gone").write_text("gone")
    (low / "cache" / "old").mkdir(parents=True)
    (low / "bin").mkdir()
    (low / "bin" / "tool").write_text("#!/bin/sh\n")
    os.chown(low / "bin" / "tool", 1000, 1000)
    os.chmod(low / "bin" / "tool", 0o4755)  # after chown, which clears setuid
    os.link(low / "bin" / "tool", low / "bin" / "alias")
    os.symlink("/etc/keep", low / "abs-link")
    (up / "etc").mkdir(parents=True)
    os.mknod(up / "etc" / "gone", stat.S_IFCHR, os.makedev(0, 0))
    (up / "cache").mkdir()
    os.setxattr(up / "cache", OPAQUE_XATTR_ROOT, b"y")
    os.setxattr(up / "cache", "trusted.overlay.impure", b"y")
    (up / "cache" / "new").write_text("new")
    (up / "etc" / "added").write_text("added")
    for p in [*low.rglob("*"), *up.rglob("*")]:
        os.utime(p, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    return Snapshot((low, up))


def test_local_export_writes_the_merged_view(snapshot: Snapshot, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    export_local(snapshot, dest)
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    assert found == [
        "abs-link",
        "bin",
        "bin/alias",
        "bin/tool",
        "cache",
        "cache/new",
        "etc",
        "etc/added",
        "etc/keep",
    ]
    tool = os.lstat(dest / "bin" / "tool")
    assert (stat.S_IMODE(tool.st_mode), tool.st_uid, tool.st_gid) == (0o4755, 1000, 1000)
    assert tool.st_ino == os.lstat(dest / "bin" / "alias").st_ino
    assert tool.st_mtime == 1_700_000_000
    assert os.readlink(dest / "abs-link") == "/etc/keep"
    assert not any(".overlay." in x for x in os.listxattr(dest / "cache"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_local_export_merges_into_a_non_empty_dest(snapshot: Snapshot, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    (dest / "etc").mkdir(parents=True)
    (dest / "etc" / "keep").write_text("user's old copy")
    (dest / "mine.txt").write_text("not from the build")
    export_local(snapshot, dest)
    assert (dest / "etc" / "keep").read_text() == "keep"
    assert (dest / "mine.txt").read_text() == "not from the build"
    assert (dest / "etc" / "added").exists()


def test_tar_export_streams_the_merged_view(snapshot: Snapshot) -> None:
    buf = io.BytesIO()
    export_tar(snapshot, out=buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        entries = {m.name: m for m in tf.getmembers()}
    assert list(entries) == [
        "abs-link",
        "bin",
        "bin/alias",
        "bin/tool",
        "cache",
        "cache/new",
        "etc",
        "etc/added",
        "etc/keep",
    ]
    # The first name in sorted order carries the data, later names link to it.
    assert entries["bin/alias"].isreg() and entries["bin/tool"].islnk()
    assert (entries["bin/tool"].linkname, entries["bin/alias"].uid) == ("bin/alias", 1000)
    assert all(".wh." not in name for name in entries)


def test_tar_export_to_a_file_is_atomic_and_deterministic(
    snapshot: Snapshot, tmp_path: Path
) -> None:
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    export_tar(snapshot, dest=a, clamp_mtime=1_600_000_000)
    export_tar(snapshot, dest=b, clamp_mtime=1_600_000_000)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tf:
        assert {m.mtime for m in tf.getmembers()} == {1_600_000_000}


def test_tar_export_needs_exactly_one_target(snapshot: Snapshot, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        export_tar(snapshot)
    with pytest.raises(ValueError):
        export_tar(snapshot, out=io.BytesIO(), dest=tmp_path / "x")
