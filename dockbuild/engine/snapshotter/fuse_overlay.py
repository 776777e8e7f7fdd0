"""The fuse-overlayfs snapshotter: an overlay made by the fuse-overlayfs program, where the
kernel's overlayfs refuses the cache root (an upper dir on overlayfs) but /dev/fuse is there.

The merged view is mounted in the build's mount namespace and handed to the executor as a
plain rootfs; unmounting it leaves the step's changes in the upper dir in overlay format.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dockbuild.engine.executor import PlainRootfs
from dockbuild.errors import ExecutorError


def unusable() -> str | None:
    """Why fuse-overlayfs cannot be used here, or None."""
    if shutil.which("fuse-overlayfs") is None:
        return "fuse-overlayfs is not installed"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"/dev/fuse cannot be opened ({e.strerror})"
    return None


@dataclass(frozen=True)
class FuseStep:
    rootfs: PlainRootfs

    upper: Path

    def commit(self) -> None:
        """Unmount, then turn fuse-overlayfs's own markers into the kernel's format."""
        self.release(None)
        normalize(self.upper)

    def release(self, layers: tuple[Path, ...] | None) -> None:
        """Unmount, whatever happened to the step (a no-op after commit)."""
        if os.path.ismount(self.rootfs.path):
            unmount(self.rootfs.path)


class FuseOverlaySnapshotter:
    name = "fuse-overlayfs"

    def prepare(self, layers: tuple[Path, ...], work: Path) -> FuseStep:
        lowers = [str(p) for p in reversed(layers)]
        if not lowers:
            (work / "empty").mkdir()
            lowers = [str(work / "empty")]
        merged = work / "root"
        merged.mkdir()
        options = f"lowerdir={':'.join(lowers)},upperdir={work / 'upper'},workdir={work / 'work'}"
        done = subprocess.run(
            ["fuse-overlayfs", "-o", options, str(merged)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise ExecutorError(f"fuse-overlayfs: {done.stderr.strip() or 'mount failed'}")
        return FuseStep(PlainRootfs(str(merged)), work / "upper")


def normalize(upper: Path) -> None:
    """fuse-overlayfs marks an opaque directory with ``.wh..wh..opq`` and ``.wh..opq``
    files (besides the xattr) and, where it cannot mknod, a deletion with a ``.wh.NAME`` file: make them the
    opaque xattr and whiteouts that the rest of the engine reads."""
    from dockbuild.engine.archive import (
        OPAQUE_MARKER,
        WHITEOUT_PREFIX,
        is_opaque_dir,
        make_whiteout,
        mark_opaque,
    )
    from dockbuild.userns import in_user_namespace

    rootless = in_user_namespace()
    for dirpath, _dirnames, filenames in os.walk(upper):
        for name in filenames:
            if not name.startswith(WHITEOUT_PREFIX):
                continue
            os.unlink(os.path.join(dirpath, name))
            if name in (OPAQUE_MARKER, ".wh..opq"):  # fuse-overlayfs writes both
                if not is_opaque_dir(dirpath):
                    mark_opaque(dirpath, rootless)
            elif not name.startswith(WHITEOUT_PREFIX * 2):  # not other bookkeeping
                make_whiteout(os.path.join(dirpath, name[len(WHITEOUT_PREFIX) :]))


def unmount(path: str) -> None:
    for command in (["fusermount3", "-u", path], ["fusermount", "-u", path], ["umount", path]):
        if shutil.which(command[0]) is None:
            continue
        if subprocess.run(command, capture_output=True, check=False).returncode == 0:
            return
    raise ExecutorError(f"cannot unmount the fuse-overlayfs rootfs {path}")
