"""Merged views of a layer chain: what overlayfs would show, computed without mounting."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dockbuild.engine.archive import OPAQUE_XATTR_ROOT, OPAQUE_XATTR_ROOTLESS
from dockbuild.engine.snapshots import (
    Snapshot,
    list_dir,
    lookup,
    read_file,
    resolve_in_rootfs,
    walk_merged,
)
from dockbuild.errors import DockbuildError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (whiteouts, trusted.*)")


def put(root: Path, rel: str, content: str | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        path.mkdir(exist_ok=True)
    else:
        path.write_text(content)
    return path


def whiteout(root: Path, rel: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Three layers exercising each overlay rule.

    l1: the base rootfs.
    l2: deletes etc/group, makes usr/lib opaque (root form), replaces the dir var by a file.
    l3: adds usr/lib/d (merging with l2 only), deletes data, makes var a dir again,
        makes opt opaque in the rootless form.
    """
    l1, l2, l3 = (tmp_path / n for n in ("l1", "l2", "l3"))
    for rel, content in [
        ("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
        ("usr/lib/a", "a"),
        ("usr/lib/b", "b"),
        ("usr/bin/sh", "#!sh"),
        ("var/log/x", "x"),
        ("data/file", "d"),
        ("opt/old", "old"),
    ]:
        put(l1, rel, content)
    os.symlink("usr/bin", l1 / "bin")
    os.symlink("../../../../../../etc/shadow", l1 / "escape")

    put(l2, "etc")
    whiteout(l2, "etc/group")
    put(l2, "usr/lib/c", "c")
    os.setxattr(l2 / "usr" / "lib", OPAQUE_XATTR_ROOT, b"y")
    put(l2, "var", "now a file")
    os.symlink("/usr/lib", l2 / "abs")
    os.symlink("loop2", l2 / "loop1")
    os.symlink("loop1", l2 / "loop2")

    put(l3, "usr/lib/d", "d")
    whiteout(l3, "data")
    put(l3, "var/new", "n")
    put(l3, "opt/fresh", "f")
    os.setxattr(l3 / "opt", OPAQUE_XATTR_ROOTLESS, b"y")
    return l1, l2, l3


def test_walk_merged_shows_what_overlay_would(chain: tuple[Path, Path, Path]) -> None:
    l1, l2, l3 = chain
    seen = dict(walk_merged(chain))
    assert list(seen) == [
        "abs",
        "bin",
        "escape",
        "etc",
        "etc/passwd",
        "loop1",
        "loop2",
        "opt",
        "opt/fresh",
        "usr",
        "usr/bin",
        "usr/bin/sh",
        "usr/lib",
        "usr/lib/c",
        "usr/lib/d",
        "var",
        "var/new",
    ]
    assert seen["etc"] == l2 / "etc"  # the topmost copy of a directory
    assert seen["usr/lib/c"] == l2 / "usr/lib/c"
    assert seen["var"] == l3 / "var"


def test_lookup_honours_whiteouts_and_opaque_dirs(chain: tuple[Path, Path, Path]) -> None:
    l1, l2, l3 = chain
    assert lookup(chain, "etc/group") is None
    assert lookup(chain, "/etc/passwd") == l1 / "etc/passwd"
    assert lookup(chain, "usr/lib/a") is None
    assert lookup(chain, "usr/lib/d") == l3 / "usr/lib/d"
    assert lookup(chain, "data/file") is None
    assert lookup(chain, "var/log/x") is None
    assert lookup(chain, "opt/old") is None
    assert lookup(chain, "") == l3


def test_symlinks_resolve_inside_the_rootfs(chain: tuple[Path, Path, Path]) -> None:
    l1, _, _ = chain
    assert resolve_in_rootfs(chain, "bin/sh") == "usr/bin/sh"
    assert lookup(chain, "bin/sh") == l1 / "usr/bin/sh"
    assert lookup(chain, "bin") == l1 / "bin"  # a final symlink is not followed
    assert resolve_in_rootfs(chain, "/abs/../../../../etc/passwd") == "etc/passwd"
    assert read_file(chain, "abs/c") == b"c"


def test_symlinks_never_escape_the_rootfs(chain: tuple[Path, Path, Path]) -> None:
    assert resolve_in_rootfs(chain, "escape") == "etc/shadow"
    assert read_file(chain, "escape") is None


def test_symlink_loops_are_an_error(chain: tuple[Path, Path, Path]) -> None:
    with pytest.raises(DockbuildError, match="symbolic links"):
        resolve_in_rootfs(chain, "loop1")


def test_read_file_returns_contents_or_none(chain: tuple[Path, Path, Path]) -> None:
    snapshot = Snapshot(chain)
    assert snapshot.read_file("/etc/passwd") == b"root:x:0:0::/root:/bin/sh\n"
    assert snapshot.read_file("etc/group") is None
    assert snapshot.read_file("usr") is None
    assert snapshot.read_file("var") is None  # a directory again in l3


def test_a_single_layer_is_its_own_view(tmp_path: Path) -> None:
    put(tmp_path / "only", "f", "x")
    assert list(walk_merged([tmp_path / "only"])) == [("f", tmp_path / "only" / "f")]
    assert list(walk_merged([])) == []


def test_merged_view_matches_a_kernel_overlay_mount(
    chain: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    import subprocess

    l1, l2, l3 = chain
    # A kernel mount as root honours only the trusted.* form.
    os.removexattr(l3 / "opt", OPAQUE_XATTR_ROOTLESS)
    os.setxattr(l3 / "opt", OPAQUE_XATTR_ROOT, b"y")
    merged = tmp_path / "merged"
    merged.mkdir()
    lowers = ":".join(str(p) for p in (l3, l2, l1))
    mount = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowers}", str(merged)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"no overlay mount here: {mount.stderr.strip()}")
    try:
        kernel = sorted(str(p.relative_to(merged)) for p in merged.rglob("*"))
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    assert sorted(rel for rel, _ in walk_merged(chain)) == kernel


def test_list_dir_shows_the_merged_children(chain: tuple[Path, Path, Path]) -> None:
    assert list_dir(chain, "etc") == ["passwd"]
    assert list_dir(chain, "usr/lib") == ["c", "d"]
    assert list_dir(chain, "bin") == ["sh"]  # through the symlink
    assert list_dir(chain, "var") == ["new"]
    assert list_dir(chain, "data") == []
    assert list_dir(chain, "etc/passwd") == []
    assert list_dir(chain, "") == [rel for rel, _ in walk_merged(chain) if "/" not in rel]


# -- snapshotters: a step's rootfs from a chain, and its changes in overlay format -----------


def _work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "upper").mkdir(parents=True)
    (work / "work").mkdir()
    return work


def test_overlay_snapshotter_gives_the_chain_top_first_and_an_empty_lower_for_scratch(
    tmp_path: Path,
) -> None:
    from dockbuild.engine.executor import OverlayRootfs
    from dockbuild.engine.snapshotter import by_name

    snapshotter = by_name("overlay", tmp_path)
    assert snapshotter.name == "overlay"
    work = _work(tmp_path)
    bottom, top = put(tmp_path, "l1"), put(tmp_path, "l2")
    step = snapshotter.prepare((bottom, top), work)
    assert step.rootfs == OverlayRootfs((str(top), str(bottom)), str(work / "upper"), str(work / "work"))
    step.commit()
    assert not any((work / "upper").iterdir())  # the kernel writes the upper dir, not commit
    scratch = snapshotter.prepare((), _work(tmp_path / "s"))
    assert isinstance(scratch.rootfs, OverlayRootfs)
    (lower,) = scratch.rootfs.lowerdirs
    assert os.listdir(lower) == []


def test_copy_snapshotter_copies_the_merged_view_and_commits_changes_as_overlay_upper(
    tmp_path: Path,
) -> None:
    from dockbuild.engine.executor import PlainRootfs
    from dockbuild.engine.snapshotter import by_name

    snapshotter = by_name("copy", tmp_path / "cache")
    assert snapshotter.name == "copy"
    base, over = tmp_path / "base", tmp_path / "over"
    put(base, "etc/keep", "k")
    put(base, "etc/gone", "g")
    put(base, "etc/hidden", "h")
    whiteout(over, "etc/hidden")
    put(over, "etc/keep", "k2")
    work = _work(tmp_path)
    step = snapshotter.prepare((base, over), work)
    assert isinstance(step.rootfs, PlainRootfs)
    root = Path(step.rootfs.path)
    assert sorted(os.listdir(root / "etc")) == ["gone", "keep"]
    assert (root / "etc" / "keep").read_text() == "k2"
    # The step: one file removed, one added.
    (root / "etc" / "gone").unlink()
    (root / "etc" / "new").write_text("n")
    step.commit()
    upper = work / "upper"
    assert (upper / "etc" / "new").read_text() == "n"
    gone = os.lstat(upper / "etc" / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == os.makedev(0, 0)  # a whiteout
    assert not (upper / "etc" / "keep").exists()  # unchanged: not in the layer


def test_copy_snapshotter_records_a_directory_made_again_as_opaque_like_overlayfs(
    tmp_path: Path,
) -> None:
    from dockbuild.engine.snapshotter import by_name

    base = tmp_path / "base"
    put(base, "d/opq/x", "x")
    put(base, "d/opq/sub/z", "z")
    put(base, "d/keep", "k")
    work = _work(tmp_path)
    step = by_name("copy", tmp_path / "cache").prepare((base,), work)
    root = Path(step.rootfs.path)
    import shutil

    shutil.rmtree(root / "d" / "opq")
    put(root, "d/opq/y", "y")
    step.commit()
    upper = work / "upper"
    assert os.getxattr(upper / "d" / "opq", OPAQUE_XATTR_ROOT) == b"y"
    assert sorted(os.listdir(upper / "d" / "opq")) == ["y"]  # no whiteouts below it
    assert not (upper / "d" / "keep").exists()


_ON_OVERLAYFS = """
import os, stat, sys
from pathlib import Path
from dockbuild.engine import archive
from dockbuild.engine.snapshotter.probe import verdict
from dockbuild.engine.snapshots import walk_merged

root = Path(sys.argv[1]) / "merged" / "cache"
root.mkdir()
archive.use_whiteout_marker(root)
print(verdict(root, True).reason)
layer = root / "layer"
(layer / "d").mkdir(parents=True)
archive.make_whiteout(layer / "d" / "gone")
st = os.lstat(layer / "d" / "gone")
print(stat.S_ISREG(st.st_mode), archive.is_whiteout(st))
print(sorted(rel for rel, _ in walk_merged((layer,))))
print(verdict(root, True).name, archive.has_whiteout_marker(root))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts an overlay")
def test_a_cache_root_on_overlayfs_gets_the_copy_snapshotter_and_marker_whiteouts(
    tmp_path: Path,
) -> None:
    # The cache root on a container's own filesystem: overlayfs below it refuses an upper
    # dir ("Invalid argument") and refuses to make char-device whiteouts.
    import subprocess
    import sys

    for d in ("lower", "upper", "work", "merged"):
        (tmp_path / d).mkdir()
    script = (
        f"mount -t overlay overlay -o lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,"
        f'workdir={tmp_path}/work {tmp_path}/merged && exec "$@"'
    )
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", sys.executable, "-c", _ON_OVERLAYFS,
         str(tmp_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    reason, kinds, merged, after = done.stdout.splitlines()
    assert "overlayfs refuses the cache root" in reason and "Invalid argument" in reason
    assert kinds == "True True"  # a link to the marker, recognised as a whiteout
    assert merged == "['d']"  # the whiteout hides nothing and is not a file
    assert after == "copy True"


def test_the_snapshotter_verdict_is_probed_once_and_remembered_per_file_system(
    tmp_path: Path,
) -> None:
    import json

    from dockbuild.engine.snapshotter import probe

    root = tmp_path / "cache"
    root.mkdir()
    first = probe.verdict(root, True)
    if os.geteuid() == 0:
        assert first.name == "overlay", first.reason
    (key, recorded), = json.loads((root / probe.VERDICTS).read_text()).items()
    assert key.startswith(f"{os.stat(root).st_dev}:") and os.uname().release in key
    assert recorded["name"] == first.name
    probe._known.clear()
    again = probe.verdict(root, True)
    assert again.name == first.name and again.reason.endswith("(remembered)")
    assert probe.verdict(root, False).name == "copy"  # an executor that cannot mount


def test_fuse_overlay_snapshotter_leaves_the_changes_in_overlay_format(tmp_path: Path) -> None:
    import shutil

    from dockbuild.engine.archive import is_opaque_dir, is_whiteout
    from dockbuild.engine.snapshotter import by_name
    from dockbuild.engine.snapshotter.fuse_overlay import unusable

    if unusable() or os.geteuid() != 0:
        pytest.skip(f"fuse-overlayfs cannot mount here: {unusable() or 'not root'}")
    base = tmp_path / "base"
    put(base, "d/opq/x", "x")
    put(base, "d/gone", "g")
    work = _work(tmp_path)
    step = by_name("fuse-overlayfs", tmp_path).prepare((base,), work)
    try:
        root = Path(step.rootfs.path)
        assert (root / "d" / "opq" / "x").read_text() == "x"
        shutil.rmtree(root / "d" / "opq")
        put(root, "d/opq/y", "y")
        (root / "d" / "gone").unlink()
        step.commit()
    finally:
        step.release(None)
    assert not os.path.ismount(step.rootfs.path)
    upper = work / "upper"
    assert is_whiteout(os.lstat(upper / "d" / "gone"))
    assert is_opaque_dir(upper / "d" / "opq"), os.listxattr(upper / "d" / "opq")
    assert os.listdir(upper / "d" / "opq") == ["y"]  # no marker files of its own
    assert (base / "d" / "gone").exists()  # the lower layer is untouched


def _tree(root: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    """Every entry below ``root``: type and mode, owner, mtime, contents."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = Path(path).read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, data)
    return out


def _run_step(snapshotter: object, layers: tuple[Path, ...], work: Path, change: object, layer: Path) -> Path:
    """Prepare, change the rootfs, commit the upper dir as ``layer``, release."""
    step = snapshotter.prepare(layers, work)  # type: ignore[attr-defined]  # a Snapshotter
    root = Path(step.rootfs.path)
    change(root)  # type: ignore[operator]  # a callable
    step.commit()
    os.rename(work / "upper", layer)
    step.release((*layers, layer))
    return root


def test_copy_snapshotter_keeps_a_rootfs_across_builds_and_brings_it_back_to_an_ancestor(
    tmp_path: Path,
) -> None:
    import shutil

    from dockbuild.engine.snapshotter import by_name
    from dockbuild.engine.snapshotter.copy import materialize

    cache = tmp_path / "cache"
    cache.mkdir()
    base = tmp_path / "base"
    for i in range(5):
        put(base, f"usr/share/d{i}/f", str(i))
    put(base, "etc/passwd", "root")
    os.utime(base / "etc", ns=(10**18, 10**18))

    def step(root: Path) -> None:
        (root / "etc" / "passwd").write_text("root\nuser")  # changed in place
        shutil.rmtree(root / "usr" / "share" / "d1")  # a whiteout
        shutil.rmtree(root / "usr" / "share" / "d2")
        put(root, "usr/share/d2/g", "new")  # made again: opaque
        os.chmod(root / "usr" / "share" / "d3", 0o700)
        put(root, "opt/app/x", "x")  # new

    first = by_name("copy", cache)  # one build
    root = _run_step(first, (base,), _work(tmp_path / "w1"), step, tmp_path / "l1")
    assert not root.exists()  # moved into the cache root: kept
    untouched = os.lstat(next((cache / "rootfs").iterdir()) / "root" / "usr/share/d0/f").st_ino
    # The next build changes that step: its parent, the base, comes from the kept rootfs.
    work = _work(tmp_path / "w2")
    again = by_name("copy", cache).prepare((base,), work)
    got = Path(again.rootfs.path)
    assert os.lstat(got / "usr/share/d0/f").st_ino == untouched  # not copied again
    fresh = tmp_path / "fresh"
    materialize((base,), fresh)
    assert _tree(got) == _tree(fresh)
    # and the step's changes on it are found as on a fresh copy
    step(got)
    again.commit()
    def shape(tree: dict[str, tuple[int, int, int, int, bytes]]) -> dict[str, tuple[int, bytes]]:
        return {rel: (mode, data) for rel, (mode, _, _, _, data) in tree.items()}

    assert shape(_tree(work / "upper")) == shape(_tree(tmp_path / "l1"))


def test_copy_snapshotter_keeps_the_owner_a_single_id_build_recorded_on_a_directory(
    tmp_path: Path,
) -> None:
    from dockbuild.engine.archive import OWNER_XATTR
    from dockbuild.engine.snapshotter import by_name

    cache = tmp_path / "cache"
    cache.mkdir()
    base = tmp_path / "base"
    put(base, "app/f", "f")
    os.setxattr(base / "app", OWNER_XATTR, b"1000:1001")  # COPY --chown=1000:1001 f /app/

    def step(root: Path) -> None:
        (root / "app" / "new").write_text("n")  # /app copied up into the step's layer

    _run_step(by_name("copy", cache), (base,), _work(tmp_path / "w1"), step, tmp_path / "l1")
    assert os.getxattr(tmp_path / "l1" / "app", OWNER_XATTR) == b"1000:1001"
    # The kept rootfs brought to another chain, whose /app has no recorded owner.
    over = tmp_path / "over"
    put(over, "app")
    _run_step(by_name("copy", cache), (base, over), _work(tmp_path / "w2"), step, tmp_path / "l2")
    assert OWNER_XATTR not in os.listxattr(tmp_path / "l2" / "app")


def test_copy_snapshotter_never_hands_one_kept_rootfs_to_two_steps(tmp_path: Path) -> None:
    from dockbuild.engine.snapshotter import by_name

    cache = tmp_path / "cache"
    cache.mkdir()
    base = tmp_path / "base"
    put(base, "etc/passwd", "root")
    _run_step(by_name("copy", cache), (base,), _work(tmp_path / "w1"), lambda r: put(r, "a", "a"), tmp_path / "l1")
    one = by_name("copy", cache).prepare((base,), _work(tmp_path / "w2"))
    two = by_name("copy", cache).prepare((base,), _work(tmp_path / "w3"))
    assert one.rootfs.path != two.rootfs.path
    assert sorted(os.listdir(one.rootfs.path)) == sorted(os.listdir(two.rootfs.path)) == ["etc"]
    two.release(None)  # a failed step: its rootfs is not kept
    assert not Path(two.rootfs.path).exists()
    assert not any((cache / "rootfs").iterdir())


def test_copy_snapshotter_sees_a_symlink_pointed_elsewhere(tmp_path: Path) -> None:
    from dockbuild.engine.snapshotter import by_name

    base = tmp_path / "base"
    put(base, "etc/a", "a")
    (base / "etc" / "link").symlink_to("a")
    work = _work(tmp_path)
    (tmp_path / "cache").mkdir()
    step = by_name("copy", tmp_path / "cache").prepare((base,), work)
    link = Path(step.rootfs.path) / "etc" / "link"
    link.unlink()
    link.symlink_to("b")  # the same owner and mode, maybe even the same inode
    step.commit()
    assert os.readlink(work / "upper" / "etc" / "link") == "b"
