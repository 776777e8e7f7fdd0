"""Incremental context hashing: file digests persist in the cache db keyed by stat data,
so an unchanged context is a stat walk and only changed files are read again."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from dockbuild.engine.sources import local
from dockbuild.engine.sources.local import FileDigests, LocalDir

OLD = 1500000000


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file the hashing code opens."""
    opened: list[str] = []
    real_open = open

    def counting_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(local, "open", counting_open, raising=False)
    return opened


def _context(root: Path, n: int = 20) -> Path:
    for i in range(n):
        p = root / f"d{i % 3}" / f"f{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"file {i}\n")
        os.utime(p, (OLD, OLD))
    return root


def test_unchanged_context_is_not_read_again_by_a_new_process(tmp_path: Path, reads: list[str]) -> None:
    ctx = _context(tmp_path / "ctx")
    db = tmp_path / "db.sqlite"
    digests = FileDigests(db)
    first = LocalDir(ctx, digests=digests).checksum([""])
    digests.close()
    assert len(reads) == 20
    reads.clear()
    # A new FileDigests stands for the next dockbuild process on the same cache.
    second = LocalDir(ctx, digests=FileDigests(db)).checksum([""])
    assert second == first
    assert reads == []


def test_a_changed_file_is_read_again_and_changes_the_checksum(tmp_path: Path, reads: list[str]) -> None:
    ctx = _context(tmp_path / "ctx")
    db = tmp_path / "db.sqlite"
    first = LocalDir(ctx, digests=FileDigests(db)).checksum([""])
    reads.clear()
    changed = ctx / "d1" / "f1.txt"
    changed.write_text("file 1, edited\n")  # same size class, new content
    os.utime(changed, (OLD, OLD))  # even with the old mtime: inode ctime moved
    second = LocalDir(ctx, digests=FileDigests(db)).checksum([""])
    assert second != first
    assert reads == [str(changed)]


def test_same_stat_and_content_give_the_same_checksum_without_a_db(tmp_path: Path) -> None:
    ctx = _context(tmp_path / "ctx")
    assert LocalDir(ctx).checksum(["d0"]) == LocalDir(ctx).checksum(["d0"])
    assert LocalDir(ctx).checksum(["d0"]) != LocalDir(ctx).checksum(["d1"])


def test_files_modified_just_now_are_not_remembered(tmp_path: Path, reads: list[str]) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "fresh.txt").write_text("fresh\n")  # mtime = now: could change again unseen
    db = tmp_path / "db.sqlite"
    LocalDir(ctx, digests=FileDigests(db)).checksum([""])
    LocalDir(ctx, digests=FileDigests(db)).checksum([""])
    assert reads.count(str(ctx / "fresh.txt")) == 2


def test_ignored_files_never_enter_the_checksum(tmp_path: Path) -> None:
    ctx = _context(tmp_path / "ctx")
    before = LocalDir(ctx, excludes=("*.log",)).checksum([""])
    (ctx / "debug.log").write_text("noise\n")
    assert LocalDir(ctx, excludes=("*.log",)).checksum([""]) == before
    assert LocalDir(ctx).checksum([""]) != before


def _mutations() -> dict[str, object]:
    def add(ctx: Path) -> None:
        (ctx / "d2" / "new.txt").write_text("new\n")

    def remove(ctx: Path) -> None:
        (ctx / "d0" / "f0.txt").unlink()

    def chmod(ctx: Path) -> None:
        os.chmod(ctx / "d1" / "f4.txt", 0o755)

    def relink(ctx: Path) -> None:
        (ctx / "link").unlink()
        (ctx / "link").symlink_to("d1")

    def same_size_same_mtime(ctx: Path) -> None:
        p = ctx / "d0" / "f3.txt"
        p.write_text("file X\n")  # as long as "file 3\n"
        os.utime(p, (OLD, OLD))

    def empty_dir(ctx: Path) -> None:
        (ctx / "d2" / "empty").mkdir()

    return {f.__name__: f for f in (add, remove, chmod, relink, same_size_same_mtime, empty_dir)}


@pytest.mark.parametrize("change", sorted(_mutations()))
def test_a_remembered_tree_gives_what_a_fresh_hash_gives_after_any_change(tmp_path: Path, change: str) -> None:
    ctx = _context(tmp_path / "ctx")
    (ctx / "link").symlink_to("d0")
    db = tmp_path / "db.sqlite"
    before = LocalDir(ctx, digests=FileDigests(db)).checksum([""])
    _mutations()[change](ctx)  # type: ignore[operator]
    after = LocalDir(ctx, digests=FileDigests(db)).checksum([""])
    assert after != before
    assert after == LocalDir(ctx).checksum([""])  # no table: everything hashed afresh
    assert LocalDir(ctx, digests=FileDigests(db)).checksum([""]) == after


def test_trees_remembered_under_other_ignore_rules_are_not_reused(tmp_path: Path) -> None:
    ctx = _context(tmp_path / "ctx")
    (ctx / "d0" / "debug.log").write_text("noise\n")
    db = tmp_path / "db.sqlite"
    ignoring = LocalDir(ctx, excludes=("**/*.log",), digests=FileDigests(db)).checksum([""])
    keeping = LocalDir(ctx, digests=FileDigests(db)).checksum([""])
    assert ignoring != keeping
    assert ignoring == LocalDir(ctx, excludes=("**/*.log",)).checksum([""])
    assert keeping == LocalDir(ctx).checksum([""])


def test_a_subdirectory_hashes_the_same_alone_and_within_the_whole(tmp_path: Path) -> None:
    ctx = _context(tmp_path / "ctx")
    db = tmp_path / "db.sqlite"
    LocalDir(ctx, digests=FileDigests(db)).checksum([""])  # remembers every directory
    assert LocalDir(ctx, digests=FileDigests(db)).checksum(["d1"]) == LocalDir(ctx).checksum(["d1"])


def test_a_prefetch_gives_the_same_checksum_and_stops_when_unused(tmp_path: Path) -> None:
    ctx = _context(tmp_path / "ctx")
    expected = LocalDir(ctx).checksum([""])
    local = LocalDir(ctx, digests=FileDigests(tmp_path / "db.sqlite"))
    local.prefetch()
    assert local.checksum([""]) == expected
    local.stop()
    # What the child recorded lets the next process skip hashing: only stats.
    again = LocalDir(ctx, digests=FileDigests(tmp_path / "db.sqlite"))
    assert again.checksum([""]) == expected
    unused = LocalDir(ctx, digests=FileDigests(tmp_path / "db2.sqlite"))
    unused.prefetch()
    pid = unused._prefetch[0][0]  # type: ignore[index]
    unused.stop()  # the child is killed and reaped: no process outlives the build
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert LocalDir(ctx, digests=FileDigests(tmp_path / "db2.sqlite")).checksum([""]) == expected


def test_a_prefetch_that_dies_leaves_the_checksum_to_the_build(tmp_path: Path) -> None:
    ctx = _context(tmp_path / "ctx")
    expected = LocalDir(ctx).checksum([""])
    local = LocalDir(ctx, digests=FileDigests(tmp_path / "db.sqlite"))
    local.prefetch()
    os.kill(local._prefetch[0][0], signal.SIGKILL)  # type: ignore[index]
    assert local.checksum([""]) == expected
    assert local._prefetch is None


def test_a_prefetch_sees_the_ignore_rules(tmp_path: Path) -> None:
    ctx = _context(tmp_path / "ctx")
    (ctx / "skip.log").write_text("noise\n")
    expected = LocalDir(ctx, excludes=("*.log",)).checksum([""])
    local = LocalDir(ctx, excludes=("*.log",), digests=FileDigests(tmp_path / "db.sqlite"))
    local.prefetch()
    assert local.checksum([""]) == expected
    assert expected != LocalDir(ctx).checksum([""])


def test_a_prefetch_shared_by_two_children_gives_the_same_checksum(tmp_path: Path) -> None:
    """The children split the subdirectories of the first directory that branches (here
    src/, below a root with one subdirectory); the build hashes what is above them."""
    ctx = tmp_path / "ctx"
    _context(ctx / "src", n=30)
    (ctx / "Dockerfile").write_text("FROM scratch\n")
    (ctx / "src" / "top.txt").write_text("top\n")
    expected = LocalDir(ctx).checksum([""])
    local = LocalDir(ctx, digests=FileDigests(tmp_path / "db.sqlite"))
    assert local._shares() == [["src/d0", "src/d2"], ["src/d1"]]
    local.prefetch()
    assert len(local._prefetch or []) == 2
    assert local.checksum([""]) == expected
    assert local.checksum(["src/d1"]) == LocalDir(ctx).checksum(["src/d1"])
    # One child killed: its share is hashed by the build itself.
    again = LocalDir(ctx, digests=FileDigests(tmp_path / "db2.sqlite"))
    again.prefetch()
    os.kill(again._prefetch[1][0], signal.SIGKILL)  # type: ignore[index]
    assert again.checksum([""]) == expected
    # A change below one share is seen by the next prefetching process.
    (ctx / "src" / "d1" / "f1.txt").write_text("changed\n")
    changed = LocalDir(ctx, digests=FileDigests(tmp_path / "db.sqlite"))
    changed.prefetch()
    assert changed.checksum([""]) == LocalDir(ctx).checksum([""]) != expected


def test_a_context_with_many_entries_above_its_branches_is_prefetched_by_one_child(tmp_path: Path) -> None:
    ctx = _context(tmp_path / "ctx", n=6)
    for i in range(300):
        (ctx / f"top{i}.txt").write_text("top\n")
    local = LocalDir(ctx, digests=FileDigests(tmp_path / "db.sqlite"))
    assert local._shares() == [[""]]
    local.prefetch()
    assert local.checksum([""]) == LocalDir(ctx).checksum([""])
