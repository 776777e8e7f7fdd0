"""File ops in-process: ADD of a local archive stays inside the layer whatever the tar
says (``..``, absolute paths, symlink and hardlink escapes) and keeps archive metadata;
copies keep setuid bits, metadata under parallel writes, and the later of two sources."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from dockbuild import llb
from dockbuild.engine import fileop
from dockbuild.engine.sources.local import LocalDir
from dockbuild.errors import DockbuildError


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = 0o644
    info.mtime = 1500000000
    return info, io.BytesIO(data) if kind == tarfile.REGTYPE else None


def _add(tmp_path: Path, members: list[tuple], dest: str = "/x/") -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    with tarfile.open(ctx / "a.tar", "w") as tf:
        for info, data in members:
            tf.addfile(info, data)
    upper = tmp_path / "upper"
    upper.mkdir()
    action = llb.Copy(source=None, src="a.tar", dest=dest, attempt_unpack=True)
    fileop.apply((action,), [], upper, [fileop.LocalView(LocalDir(ctx))])
    return upper


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_dotdot_and_absolute_names_stay_inside(tmp_path: Path) -> None:
    upper = _add(tmp_path, [_member("../../escape1", data=b"1"), _member("/abs/escape2", data=b"2")])
    assert (upper / "x/escape1").read_bytes() == b"1"
    assert (upper / "x/abs/escape2").read_bytes() == b"2"
    assert not (tmp_path / "escape1").exists()


def test_symlink_parent_escape_is_resolved_inside_the_rootfs(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    upper = _add(tmp_path, [
        _member("evil", tarfile.SYMTYPE, link=str(outside)),
        _member("evil/pwned", data=b"p"),
        _member("rel", tarfile.SYMTYPE, link="../../../../.."),
        _member("rel/pwned2", data=b"q"),
    ])
    assert list(outside.iterdir()) == []
    # the symlink is followed the way a chroot would: inside the layer
    assert (upper / str(outside).lstrip("/") / "pwned").read_bytes() == b"p"
    assert (upper / "pwned2").read_bytes() == b"q"
    assert os.readlink(upper / "x/evil") == str(outside)


def test_hardlink_to_a_host_path_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    with pytest.raises(DockbuildError, match="missing"):
        _add(tmp_path, [_member("h", tarfile.LNKTYPE, link=str(secret))])


def test_hardlinks_inside_the_archive_are_kept(tmp_path: Path) -> None:
    upper = _add(tmp_path, [_member("a", data=b"same"), _member("b", tarfile.LNKTYPE, link="a")])
    assert os.lstat(upper / "x/a").st_ino == os.lstat(upper / "x/b").st_ino
    assert os.lstat(upper / "x/a").st_mtime == 1500000000


def test_a_plain_file_named_like_an_archive_is_copied(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "not.tar.gz").write_text("just text")
    upper = tmp_path / "upper"
    upper.mkdir()
    action = llb.Copy(source=None, src="not.tar.gz", dest="/d/", attempt_unpack=True)
    fileop.apply((action,), [], upper, [fileop.LocalView(LocalDir(ctx))])
    assert (upper / "d/not.tar.gz").read_text() == "just text"


def test_setuid_bits_survive_copy_and_chown(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "suid").write_text("x")
    os.chmod(ctx / "suid", 0o4755)
    upper = tmp_path / "upper"
    upper.mkdir()
    action = llb.Copy(source=None, src="suid", dest="/bin/suid", chown=llb.Chown("1000", "1000"))
    fileop.apply((action,), [], upper, [fileop.LocalView(LocalDir(ctx))])
    st = os.lstat(upper / "bin/suid")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o4755, 1000, 1000)


def test_many_files_copied_in_parallel_keep_their_metadata(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    for i in range(600):
        p = ctx / f"d{i % 7}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"%d" % i * (i % 50))
        os.chmod(p, 0o600 + (i % 2) * 0o55)
        os.utime(p, (1400000000 + i, 1400000000 + i))
    upper = tmp_path / "upper"
    upper.mkdir()
    fileop.apply((llb.Copy(source=None, src=".", dest="/c/"),), [], upper, [fileop.LocalView(LocalDir(ctx))])
    for i in range(600):
        rel = f"d{i % 7}/f{i}"
        st = os.lstat(upper / "c" / rel)
        assert (upper / "c" / rel).read_bytes() == (ctx / rel).read_bytes()
        assert st.st_mode & 0o7777 == 0o600 + (i % 2) * 0o55
        assert st.st_mtime == 1400000000 + i
        assert (st.st_uid, st.st_gid) == (0, 0)


def test_two_sources_for_one_destination_the_later_wins(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    for d in ("dir1", "dir2"):
        (ctx / d).mkdir(parents=True)
        (ctx / d / "x.txt").write_text(d)
    upper = tmp_path / "upper"
    upper.mkdir()
    action = llb.Copy(source=None, src="dir*/x.txt", dest="/out/")
    fileop.apply((action,), [], upper, [fileop.LocalView(LocalDir(ctx))])
    assert (upper / "out/x.txt").read_text() == "dir2"


def test_copy_from_another_filesystem_keeps_contents(tmp_path: Path) -> None:
    # A context on tmpfs copied into a layer on the cache's filesystem: the kernel copy
    # (copy_file_range) refuses to cross file systems, the read/write fallback takes over.
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        ctx = Path(shm)
        (ctx / "big.bin").write_bytes(os.urandom(3 << 20))
        (ctx / "empty").write_bytes(b"")
        upper = tmp_path / "upper"
        upper.mkdir()
        fileop.apply((llb.Copy(source=None, src=".", dest="/c/"),), [], upper, [fileop.LocalView(LocalDir(ctx))])
        assert (upper / "c/big.bin").read_bytes() == (ctx / "big.bin").read_bytes()
        assert (upper / "c/empty").read_bytes() == b""


def test_two_directory_sources_merge_into_one_new_destination(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    for d, names in (("a", ("same.txt", "only-a.txt", "sub/x")), ("b", ("same.txt", "only-b.txt", "sub/x"))):
        for name in names:
            p = ctx / d / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"{d}:{name}")
    upper = tmp_path / "upper"
    upper.mkdir()
    actions = (llb.Copy(source=None, src="a", dest="/out/"), llb.Copy(source=None, src="b", dest="/out/"))
    views = [fileop.LocalView(LocalDir(ctx)), fileop.LocalView(LocalDir(ctx))]
    fileop.apply(actions, [], upper, views)
    assert _all_files(upper / "out") == ["only-a.txt", "only-b.txt", "same.txt", "sub", "sub/x"]
    assert (upper / "out/same.txt").read_text() == "b:same.txt"
    assert (upper / "out/sub/x").read_text() == "b:sub/x"


def test_a_copy_links_the_unchanged_files_of_the_last_run_and_copies_the_rest(tmp_path: Path) -> None:
    from dockbuild.engine.sources.local import FileDigests

    ctx = tmp_path / "ctx"
    for i in range(6):
        p = ctx / f"d{i % 2}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"file {i}\n")
        os.utime(p, (1500000000, 1500000000))
    db = tmp_path / "db.sqlite"
    copy = (llb.Copy(source=None, src=".", dest="/app/"),)

    def run(upper: Path, reuse: tuple[Path, ...]) -> None:
        # a new LocalDir and FileDigests per run: the next dockbuild process
        digests = FileDigests(db)
        local = LocalDir(ctx, digests=digests)
        local.checksum([""])  # the step's key, as the solver computes it first
        upper.mkdir()
        fileop.apply(copy, [], upper, [fileop.LocalView(local)], reuse)
        digests.close()

    first = tmp_path / "first"
    run(first, ())
    (ctx / "d0/f0").write_text("a longer file 0\n")  # the first file copied: no candidate
    (ctx / "d1/f3").write_text("FILE 3\n")  # same size, same mtime: new content
    for name in ("d0/f0", "d1/f3"):
        os.utime(ctx / name, (1500000000, 1500000000))
    os.chmod(ctx / "d1/f1", 0o600)
    second = tmp_path / "second"
    run(second, (first,))
    for i in range(6):
        rel = f"app/d{i % 2}/f{i}"
        assert (second / rel).read_bytes() == (ctx / rel[4:]).read_bytes()
        linked = os.lstat(second / rel).st_ino == os.lstat(first / rel).st_ino
        assert linked == (i not in (0, 1, 3)), rel
    assert os.lstat(second / "app/d1/f1").st_mode & 0o777 == 0o600
    assert (first / "app/d1/f3").read_text() == "file 3\n"  # the earlier layer is untouched
    # The links are remembered too (a link moves the inode's ctime): a third run links
    # everything from the second.
    third = tmp_path / "third"
    run(third, (second,))
    for i in range(6):
        rel = f"app/d{i % 2}/f{i}"
        assert os.lstat(third / rel).st_ino == os.lstat(second / rel).st_ino, rel


def test_a_layer_file_changed_after_its_copy_is_not_linked(tmp_path: Path) -> None:
    from dockbuild.engine.sources.local import FileDigests

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "f").write_text("right\n")
    os.utime(ctx / "f", (1500000000, 1500000000))
    db = tmp_path / "db.sqlite"
    copy = (llb.Copy(source=None, src=".", dest="/app/"),)
    first, second = tmp_path / "first", tmp_path / "second"
    for upper, reuse in ((first, ()), (second, (first,))):
        if upper is second:  # something rewrote the earlier layer's file in place
            (first / "app/f").write_text("wrong\n")
            os.utime(first / "app/f", (1500000000, 1500000000))
        digests = FileDigests(db)
        local = LocalDir(ctx, digests=digests)
        local.checksum([""])
        upper.mkdir()
        fileop.apply(copy, [], upper, [fileop.LocalView(local)], reuse)
        digests.close()
    assert (second / "app/f").read_text() == "right\n"


def test_hardlinks_copied_from_a_layer_stay_linked_when_written_by_threads(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "d").mkdir(parents=True)
    for i in range(300):  # enough files for the copy's threads to be busy
        (layer / "d" / f"f{i:03}").write_text(f"{i}\n")
        if i % 3 == 0:
            os.link(layer / "d" / f"f{i:03}", layer / "d" / f"g{i:03}")
    upper = tmp_path / "upper"
    upper.mkdir()
    fileop.apply((llb.Copy(source=None, src="d", dest="/out/"),), [], upper, [fileop.LayersView([layer])])
    for i in range(300):
        f = upper / "out" / f"f{i:03}"
        assert f.read_text() == f"{i}\n"
        if i % 3 == 0:
            assert os.lstat(upper / "out" / f"g{i:03}").st_ino == os.lstat(f).st_ino
            assert os.lstat(f).st_ino != os.lstat(layer / "d" / f"f{i:03}").st_ino  # a copy, not the layer's file
