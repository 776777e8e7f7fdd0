"""Layer tars: safe unpacking into overlay format, and deterministic diff tars."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from dockbuild.engine.archive import (
    OPAQUE_XATTR_ROOT,
    OPAQUE_XATTR_ROOTLESS,
    is_opaque_dir,
    layer_is_empty,
    layer_owner,
    open_blob,
    unpack_layer,
    write_layer_tar,
)
from dockbuild.errors import SecurityError

# vfs_cap_data revision 2 for cap_net_bind_service=ep (as setcap writes it).
CAP_NET_BIND_SERVICE = bytes.fromhex("0100000200040000") + bytes(12)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, trusted.*)")


def make_tar(*members: tuple[str, str, dict]) -> bytes:
    """A tar from (name, kind, options) with kind one of file/dir/sym/link/chr/fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, opts in members:
            ti = tarfile.TarInfo(name)
            ti.mode = opts.get("mode", 0o755 if kind == "dir" else 0o644)
            ti.uid = opts.get("uid", 0)
            ti.gid = opts.get("gid", 0)
            ti.mtime = opts.get("mtime", 1_600_000_000)
            if "xattrs" in opts:
                ti.pax_headers = {
                    f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                    for k, v in opts["xattrs"].items()
                }
            data = opts.get("data", b"")
            ti.type = {
                "file": tarfile.REGTYPE,
                "dir": tarfile.DIRTYPE,
                "sym": tarfile.SYMTYPE,
                "link": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            ti.linkname = opts.get("target", "")
            ti.devmajor, ti.devminor = opts.get("dev", (0, 0))
            if kind == "file":
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def unpack(data: bytes, dest: Path, **kw: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    unpack_layer(io.BytesIO(data), dest, **kw)
    return dest


def tar_members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()


def layer_tar(layer: Path, **kw: int) -> bytes:
    out = io.BytesIO()
    write_layer_tar(layer, out, **kw)
    return out.getvalue()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- safety -------------------------------------------------------------------------------


def test_dotdot_entry_is_refused_and_nothing_escapes(tmp_path: Path) -> None:
    data = make_tar(("ok", "file", {"data": b"1"}), ("../evil", "file", {"data": b"x"}))
    with pytest.raises(SecurityError, match=r"\.\./evil"):
        unpack(data, tmp_path / "box" / "dest")
    assert not (tmp_path / "box" / "evil").exists()


def test_absolute_names_land_inside_dest(tmp_path: Path) -> None:
    dest = unpack(make_tar(("/abs/file", "file", {"data": b"in"})), tmp_path / "dest")
    assert (dest / "abs" / "file").read_bytes() == b"in"


def test_absolute_name_that_climbs_out_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecurityError):
        unpack(make_tar(("/../../escape", "file", {"data": b"x"})), tmp_path / "a" / "dest")
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "a" / "escape").exists()


def test_writing_through_a_symlink_of_the_layer_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    data = make_tar(
        ("a", "sym", {"target": str(outside)}),
        ("a/passwd", "file", {"data": b"pwned"}),
    )
    with pytest.raises(SecurityError, match="a/passwd"):
        unpack(data, tmp_path / "dest")
    assert list(outside.iterdir()) == []


def test_relative_symlink_escape_is_refused_too(tmp_path: Path) -> None:
    data = make_tar(("up", "sym", {"target": "../.."}), ("up/x/y", "file", {"data": b"x"}))
    with pytest.raises(SecurityError):
        unpack(data, tmp_path / "a" / "dest")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("target", ["../outside/secret", "/etc/passwd", "missing", "s/secret"])
def test_hardlinks_out_of_the_layer_are_refused(tmp_path: Path, target: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    data = make_tar(("s", "sym", {"target": str(outside)}), ("h", "link", {"target": target}))
    with pytest.raises(SecurityError, match="'h'"):
        unpack(data, tmp_path / "dest")
    assert os.stat(outside / "secret").st_nlink == 1


def test_absolute_symlink_is_kept_but_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "file"
    victim.write_text("original")
    data = make_tar(
        ("etc", "sym", {"target": "/etc"}),
        ("f", "sym", {"target": str(victim)}),
        ("f", "file", {"data": b"replaced"}),
    )
    dest = unpack(data, tmp_path / "dest")
    assert os.readlink(dest / "etc") == "/etc"
    assert not (dest / "f").is_symlink()
    assert (dest / "f").read_bytes() == b"replaced"
    assert victim.read_text() == "original"


# --- content and metadata -------------------------------------------------------------------


@needs_root
def test_metadata_is_kept(tmp_path: Path) -> None:
    data = make_tar(
        ("d", "dir", {"mode": 0o1777, "mtime": 1_000_000}),
        ("d/suid", "file", {"mode": 0o4755, "uid": 1000, "gid": 2000, "data": b"x"}),
        ("d/cap", "file", {"xattrs": {"user.note": b"\xff\x00bin"}, "data": b"y"}),
        ("d/fifo", "fifo", {"mode": 0o600}),
        ("d/null", "chr", {"dev": (1, 3), "mode": 0o666}),
        ("d/rel", "sym", {"target": "suid", "uid": 7}),
    )
    dest = unpack(data, tmp_path / "dest")
    d = os.lstat(dest / "d")
    assert stat.S_IMODE(d.st_mode) == 0o1777
    assert d.st_mtime == 1_000_000  # set after its children were created
    s = os.lstat(dest / "d" / "suid")
    assert (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid) == (0o4755, 1000, 2000)
    assert s.st_mtime == 1_600_000_000
    assert os.getxattr(dest / "d" / "cap", "user.note") == b"\xff\x00bin"
    assert stat.S_ISFIFO(os.lstat(dest / "d" / "fifo").st_mode)
    assert os.lstat(dest / "d" / "null").st_rdev == os.makedev(1, 3)
    assert os.lstat(dest / "d" / "rel").st_uid == 7


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    data = make_tar(
        ("x", "dir", {}),
        ("x/child", "file", {"data": b"c"}),
        ("x", "file", {"data": b"now a file"}),
        ("y", "file", {"data": b"first"}),
        ("y", "file", {"data": b"second"}),
        ("z", "dir", {"mode": 0o700}),
        ("z/keep", "file", {}),
        ("z", "dir", {"mode": 0o750}),
    )
    dest = unpack(data, tmp_path / "dest")
    assert (dest / "x").read_bytes() == b"now a file"
    assert (dest / "y").read_bytes() == b"second"
    assert (dest / "z" / "keep").exists()
    assert stat.S_IMODE(os.lstat(dest / "z").st_mode) == 0o750


def test_hardlink_to_an_earlier_entry_shares_the_inode(tmp_path: Path) -> None:
    data = make_tar(("a/f", "file", {"data": b"same"}), ("b", "link", {"target": "a/f"}))
    dest = unpack(data, tmp_path / "dest")
    assert os.stat(dest / "b").st_ino == os.stat(dest / "a" / "f").st_ino


def test_missing_parents_are_created(tmp_path: Path) -> None:
    dest = unpack(make_tar(("p/q/r", "file", {"data": b"r"})), tmp_path / "dest")
    assert (dest / "p" / "q" / "r").read_bytes() == b"r"


def test_unpack_reads_the_stream_to_its_end(tmp_path: Path) -> None:
    data = make_tar(("f", "file", {"data": b"abc"})) + b"\0" * 4096
    stream = io.BytesIO(data)
    (tmp_path / "d").mkdir()
    unpack_layer(stream, tmp_path / "d")
    assert stream.tell() == len(data)


# --- whiteouts and opaque directories ------------------------------------------------------


def whiteout_tar() -> bytes:
    return make_tar(
        ("d", "dir", {}),
        ("d/.wh..wh..opq", "file", {"mode": 0}),
        ("d/keep", "file", {"data": b"k"}),
        (".wh.gone", "file", {"mode": 0}),
        ("e", "dir", {}),
        ("e/.wh.x", "file", {"mode": 0}),
    )


def is_whiteout_at(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@needs_root
def test_whiteouts_become_char_devices_and_opaque_xattrs(tmp_path: Path) -> None:
    dest = unpack(whiteout_tar(), tmp_path / "dest")
    assert is_whiteout_at(dest / "gone")
    assert is_whiteout_at(dest / "e" / "x")
    assert os.getxattr(dest / "d", OPAQUE_XATTR_ROOT) == b"y"
    assert (dest / "d" / "keep").read_bytes() == b"k"
    assert not any(".wh." in p for p in tree(dest))


@needs_root
def test_rootless_mode_marks_opaque_dirs_with_the_user_xattr(tmp_path: Path) -> None:
    dest = unpack(whiteout_tar(), tmp_path / "dest", rootless=True)
    assert os.getxattr(dest / "d", OPAQUE_XATTR_ROOTLESS) == b"y"
    with pytest.raises(OSError):
        os.getxattr(dest / "d", OPAQUE_XATTR_ROOT)
    assert is_opaque_dir(dest / "d")


@needs_root
def test_whiteouts_round_trip_to_wh_entries(tmp_path: Path) -> None:
    dest = unpack(whiteout_tar(), tmp_path / "dest")
    names = [(m.name, m.type) for m in tar_members(layer_tar(dest))]
    assert names == [
        ("d", tarfile.DIRTYPE),
        ("d/.wh..wh..opq", tarfile.REGTYPE),
        ("d/keep", tarfile.REGTYPE),
        ("e", tarfile.DIRTYPE),
        ("e/.wh.x", tarfile.REGTYPE),
        (".wh.gone", tarfile.REGTYPE),
    ]


@needs_root
def test_a_directory_deleted_and_recreated_in_one_layer_is_opaque(tmp_path: Path) -> None:
    data = make_tar((".wh.d", "file", {}), ("d", "dir", {}), ("d/new", "file", {}))
    dest = unpack(data, tmp_path / "dest")
    assert (dest / "d").is_dir()
    assert is_opaque_dir(dest / "d")


@needs_root
def test_overlay_xattrs_from_a_tar_are_ignored(tmp_path: Path) -> None:
    data = make_tar(
        ("d", "dir", {"xattrs": {"trusted.overlay.redirect": b"/etc", "user.overlay.opaque": b"y"}})
    )
    dest = unpack(data, tmp_path / "dest")
    assert not is_opaque_dir(dest / "d")
    assert all(".overlay." not in x for x in os.listxattr(dest / "d"))


@needs_root
def test_an_owner_record_from_a_tar_is_ignored_the_header_owns_the_file(tmp_path: Path) -> None:
    data = make_tar(("f", "file", {"xattrs": {"user.dockbuild.owner": b"1000:1000", "user.kept": b"1"}}))
    dest = unpack(data, tmp_path / "dest")
    assert os.listxattr(dest / "f") == ["user.kept"]
    assert layer_owner(dest / "f", os.lstat(dest / "f")) == (0, 0)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_owners_a_single_id_namespace_cannot_map_are_recorded_and_written_back(
    tmp_path: Path,
) -> None:
    """Unpacked as root of a user namespace mapping only the caller's id, as a rootless
    build without subordinate ids does: the headers' other owners come back out."""
    owned = {"uid": 1000, "gid": 1001}
    original = tmp_path / "layer.tar"
    original.write_bytes(
        make_tar(
            ("d", "dir", owned),
            ("d/f", "file", {**owned, "data": b"f"}),
            ("d/link", "sym", {**owned, "target": "f"}),
            ("d/root", "file", {}),
            ("again", "dir", owned),
            ("again", "dir", {}),  # the last header of a path owns it
        )
    )
    script = (
        "import io, sys\n"
        "from pathlib import Path\n"
        "from dockbuild.engine.archive import unpack_layer, write_layer_tar\n"
        "dest = Path(sys.argv[2]); dest.mkdir()\n"
        "with open(sys.argv[1], 'rb') as f: unpack_layer(f, dest, rootless=True)\n"
        "write_layer_tar(dest, sys.stdout.buffer)\n"
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", script, str(original), str(tmp_path / "dest")],
        capture_output=True, check=False,
    )  # fmt: skip
    if done.returncode != 0 and b"unshare failed" in done.stderr:
        pytest.skip(f"no user namespace here: {done.stderr.decode().strip()}")
    assert done.returncode == 0, done.stderr.decode()
    owners = {m.name: (m.uid, m.gid) for m in tar_members(done.stdout)}
    assert owners["d"] == owners["d/f"] == (1000, 1001)
    assert owners["d/root"] == owners["again"] == (0, 0)
    assert owners["d/link"] == (0, 0)  # a symlink takes no user.* xattr: unpacked all the same
    assert os.listxattr(tmp_path / "dest" / "d" / "root") == []  # an owner set is not recorded


# --- writing ------------------------------------------------------------------------------------


@pytest.fixture
def upperdir(tmp_path: Path) -> Path:
    """A layer directory as overlayfs leaves an upperdir."""
    root = tmp_path / "upper"
    (root / "b" / "sub").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "a" / "file").write_bytes(b"hello")
    (root / "a-b").write_bytes(b"sorts between")
    os.link(root / "a" / "file", root / "b" / "same")
    os.symlink("/abs/target", root / "b" / "link")
    os.setxattr(root / "a" / "file", "user.keep", b"1")
    os.setxattr(root / "b", "user.overlay.impure", b"y")
    if os.geteuid() == 0:
        os.mknod(root / "b" / "deleted", stat.S_IFCHR, os.makedev(0, 0))
        os.setxattr(root / "b" / "sub", OPAQUE_XATTR_ROOT, b"y")
        os.setxattr(root / "a", "trusted.overlay.origin", b"\x00\x01")
        os.setxattr(root / "a" / "file", "security.capability", CAP_NET_BIND_SERVICE)
    for p in [root, *root.rglob("*")]:
        os.utime(p, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    return root


def test_layer_tar_is_sorted_with_parents_first_and_plain_names(upperdir: Path) -> None:
    names = [m.name for m in tar_members(layer_tar(upperdir))]
    assert names[:3] == ["a", "a/file", "a-b"]
    assert names.index("b") < names.index("b/link")
    assert not any(n.startswith(("./", "/")) for n in names)
    raw = layer_tar(upperdir)
    assert b"a/\0" in raw  # directories are named with a trailing slash, as Go writes them


def test_layer_tar_is_deterministic_and_numeric(upperdir: Path) -> None:
    first, second = layer_tar(upperdir), layer_tar(upperdir)
    assert first == second
    for m in tar_members(first):
        assert (m.uname, m.gname) == ("", "")
        assert not {"atime", "ctime"} & set(m.pax_headers)


def test_clamp_mtime_only_lowers_times(upperdir: Path) -> None:
    os.utime(upperdir / "a-b", (1_000, 1_000))
    members = {m.name: m for m in tar_members(layer_tar(upperdir, clamp_mtime=1_500_000_000))}
    assert members["a/file"].mtime == 1_500_000_000
    assert members["a-b"].mtime == 1_000


def test_hardlinks_point_at_the_first_name(upperdir: Path) -> None:
    members = {m.name: m for m in tar_members(layer_tar(upperdir))}
    assert members["a/file"].isreg()
    assert members["b/same"].islnk() and members["b/same"].linkname == "a/file"


def test_overlay_xattrs_never_reach_the_tar(upperdir: Path) -> None:
    members = {m.name: m for m in tar_members(layer_tar(upperdir))}
    all_keys = {k for m in members.values() for k in m.pax_headers}
    assert not any(".overlay." in k for k in all_keys)
    assert members["a/file"].pax_headers["SCHILY.xattr.user.keep"] == "1"


@needs_root
def test_capabilities_survive_and_whiteouts_are_converted(upperdir: Path) -> None:
    members = {m.name: m for m in tar_members(layer_tar(upperdir))}
    cap = members["a/file"].pax_headers["SCHILY.xattr.security.capability"]
    assert cap.encode("utf-8", "surrogateescape") == CAP_NET_BIND_SERVICE
    assert members["b/.wh.deleted"].isreg() and members["b/.wh.deleted"].size == 0
    assert "b/sub/.wh..wh..opq" in members


@needs_root
def test_unpacked_layer_writes_back_to_the_same_bytes(upperdir: Path, tmp_path: Path) -> None:
    original = layer_tar(upperdir)
    again = unpack(original, tmp_path / "again")
    assert layer_tar(again) == original


def test_layer_is_empty(tmp_path: Path) -> None:
    (tmp_path / "l").mkdir()
    assert layer_is_empty(tmp_path / "l")
    (tmp_path / "l" / "f").touch()
    assert not layer_is_empty(tmp_path / "l")


# --- blobs ---------------------------------------------------------------------------------------


def compressors() -> dict[str, object]:
    import zstandard

    return {
        "none": lambda b: b,
        "gzip": gzip.compress,
        "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
        "bzip2": bz2.compress,
        "xz": lzma.compress,
    }


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd", "bzip2", "xz"])
def test_open_blob_detects_compression_by_content(tmp_path: Path, kind: str) -> None:
    payload = make_tar(("f", "file", {"data": os.urandom(300_000)}))
    blob = tmp_path / "blob"
    blob.write_bytes(compressors()[kind](payload))  # type: ignore[operator]
    with open_blob(blob) as stream:
        assert hashlib.sha256(stream.read()).digest() == hashlib.sha256(payload).digest()


def test_open_blob_closes_the_file_under_it(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(b"x" * 10))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with open_blob(blob) as stream:
            assert stream.read() == b"x" * 10
    assert len(os.listdir("/proc/self/fd")) == before


def test_open_blob_streams_into_unpack(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(make_tar(("dir/f", "file", {"data": b"zipped"}))))
    with open_blob(blob) as stream:
        dest = tmp_path / "dest"
        dest.mkdir()
        unpack_layer(stream, dest)
    assert (dest / "dir" / "f").read_bytes() == b"zipped"


def test_a_whiteout_replaced_by_a_file_can_be_hardlinked(tmp_path: Path) -> None:
    data = make_tar(
        (".wh.f", "file", {}),
        ("f", "file", {"data": b"new"}),
        ("g", "link", {"target": "f"}),
    )
    dest = unpack(data, tmp_path / "dest")
    assert (dest / "g").read_bytes() == b"new"
