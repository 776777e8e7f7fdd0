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
