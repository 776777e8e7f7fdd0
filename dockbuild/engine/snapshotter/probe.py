"""Which snapshotter a cache root gets: probed where the mounts happen, remembered per file system.

An overlay whose upper dir is on overlayfs (the cache root on a container's own
filesystem) cannot be mounted ("Invalid argument"), so the probe mounts one in the cache
root itself, in a child process of the build (inside the build's user namespace when
rootless: the fork server runs there too). The verdict is remembered in
``snapshotter.json`` in the cache root, keyed by device, file-system type, kernel release
and user namespace, and written by temp + rename (several builds may probe at once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

VERDICTS = "snapshotter.json"


@dataclass(frozen=True)
class Verdict:
    name: str  # "overlay" | "fuse-overlayfs" | "copy"
    reason: str


_lock = threading.Lock()
_known: dict[tuple[str, bool], Verdict] = {}


def verdict(root: Path, mounts: bool, *, enter_userns: bool = False) -> Verdict:
    """The snapshotter for RUN steps whose work dirs are in the cache root ``root``.

    ``enter_userns``: builds run in a user namespace this process is not in yet
    (``dockbuild debug info`` before the build re-runs itself in one): probe in one too.
    """
    from dockbuild import userns
    from dockbuild.engine import archive

    if not mounts:
        return Verdict("copy", "the executor cannot mount (a locked-down container)")
    if archive.has_whiteout_marker(root):
        return Verdict(
            "copy",
            "this cache root's layers were written where overlayfs could not work (deletions "
            "as links to its whiteout marker, or opaque directories by user xattr)",
        )
    wrap = enter_userns and not userns.in_user_namespace()
    with _lock:
        cached = _known.get((str(root), wrap))
        if cached is not None:
            return cached
        st = os.stat(root)
        key = (
            f"{st.st_dev}:{_fs_type(root)}:{os.uname().release}"
            f":userns={wrap or userns.in_user_namespace()}"
        )
        remembered = _read(root).get(key)
        if isinstance(remembered, dict) and "name" in remembered:
            found = Verdict(str(remembered["name"]), f"{remembered.get('reason', '')} (remembered)")
        else:
            found = _probe(root, wrap)
            _remember(root, key, found)
        _known[(str(root), wrap)] = found
        return found


def _fs_type(path: Path) -> str:
    """The type of the file system holding ``path`` (the longest mount point above it)."""
    best, fstype = "", "unknown"
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                mount_point = fields[4].replace("\\040", " ")
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, fstype = mount_point, fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        pass
    return fstype


def _read(root: Path) -> dict[str, object]:
    try:
        data = json.loads((root / VERDICTS).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(root: Path, key: str, found: Verdict) -> None:
    data = _read(root)
    data[key] = {"name": found.name, "reason": found.reason}
    tmp = root / f"{VERDICTS}.{os.getpid()}-{os.urandom(4).hex()}"
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, root / VERDICTS)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only root: probe again next time


def _probe(root: Path, wrap: bool) -> Verdict:
    from dockbuild.engine.snapshotter import fuse_overlay

    overlay = _run_probe(root, wrap, "overlay")
    if overlay == "ok":
        return Verdict("overlay", "an overlay mount with its upper dir in the cache root works")
    refused = f"overlayfs refuses the cache root ({overlay})"
    fuse = fuse_overlay.unusable() or _run_probe(root, wrap, "fuse")
    if fuse == "ok":
        return Verdict("fuse-overlayfs", f"{refused}; a fuse-overlayfs mount there works")
    return Verdict(
        "copy",
        f"{refused}; {fuse}: each RUN gets a copy of its rootfs (a cache root on a volume "
        "is faster: see docs/containers.md)",
    )


def _run_probe(root: Path, wrap: bool, kind: str) -> str:
    """ "ok", or why a ``kind`` mount fails, tried in a child process as the build would."""
    # Named like a process's temp area (its pid first), so a build killed while it probes
    # leaves a folder the next Store sweeps (Store._sweep_tmp), not one it never removes.
    base = root / "tmp" / f"{os.getpid()}-probe-{os.urandom(4).hex()}"
    base.mkdir(parents=True)
    try:
        # In a user namespace of its own (root mapped), as the build would be.
        enter = ["unshare", "--user", "--map-root-user", "--"] if wrap else []
        done = subprocess.run(
            [*enter, sys.executable, "-m", "dockbuild.engine.snapshotter.probe", kind, str(base)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return done.stdout.strip() or done.stderr.strip()[-300:] or "the probe died"
    finally:
        _remove(base)


def _remove(base: Path) -> None:
    """Remove the probe's dirs, which overlayfs may have left unreadable (work/work)."""
    import shutil

    for dirpath, dirnames, _ in os.walk(base):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o700)  # before os.walk goes in
    shutil.rmtree(base, ignore_errors=True)


def _main(kind: str, base: str) -> None:
    """In a child of the build: mount an overlay in ``base`` (the kernel's in a mount
    namespace of its own; fuse-overlayfs where the build would mount it), remove a lower
    file through it."""
    from dockbuild.engine.executor.forkserver.server import in_user_namespace
    from dockbuild.engine.executor.forkserver.syscalls import (
        CLONE_NEWNS,
        MS_PRIVATE,
        MS_REC,
        SetupError,
        mount,
        mount_upper_overlay,
        unshare,
    )

    dirs = {name: os.path.join(base, name) for name in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        os.mkdir(d)
    with open(os.path.join(dirs["lower"], "file"), "w"):
        pass
    if kind == "fuse":
        from dockbuild.engine.snapshotter.fuse_overlay import FuseOverlaySnapshotter, unmount
        from dockbuild.errors import ExecutorError

        try:
            step = FuseOverlaySnapshotter().prepare((Path(dirs["lower"]),), Path(base))
            try:
                os.unlink(os.path.join(step.rootfs.path, "file"))
            finally:
                unmount(step.rootfs.path)
            print("ok")
        except (OSError, ExecutorError) as e:
            print(str(e).replace("\n", "; "))
        return
    try:
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        mount_upper_overlay(
            dirs["merged"], [dirs["lower"]], dirs["upper"], dirs["work"], in_user_namespace()
        )
        os.unlink(os.path.join(dirs["merged"], "file"))  # a whiteout in the upper dir
        print("ok")
    except (OSError, SetupError) as e:
        print(e)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
