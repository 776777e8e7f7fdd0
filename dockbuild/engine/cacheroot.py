"""Where the cache lives: ``DOCKBUILD_ROOT``, else ``$XDG_CACHE_HOME/dockbuild``, else
``~/.cache/dockbuild``; and what to tell the user when it cannot be written.

A module of its own, without the store's imports: a build looks for the cache database
first thing, to start hashing the context in a child process while the rest of
dockbuild loads (build.py).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dockbuild.errors import DockbuildError

_FIX_ROOT = "set DOCKBUILD_ROOT (or XDG_CACHE_HOME) to a writable directory"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
_IN_THE_WAY = (errno.ENOTDIR, errno.EEXIST)


def default_root() -> Path:
    env = os.environ.get("DOCKBUILD_ROOT")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "dockbuild"


def prepare(root: Path, subdirs: tuple[str, ...] = ()) -> None:
    """Make the cache root and its ``subdirs``, and check that it can be written: a root
    that cannot is a clear error naming it and the fix (not a database "that cannot be
    read", later)."""
    from dockbuild.errors import DockbuildError

    try:
        for sub in subdirs or (".",):
            (root / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (environment_error(e, root) or e) from e
    if not os.access(root, os.W_OK | os.X_OK):
        read_only = os.statvfs(root).f_flag & os.ST_RDONLY
        reason = "Read-only file system" if read_only else "Permission denied"
        raise DockbuildError(f"cannot write the cache at {root.absolute()}: {reason}", hint=_FIX_ROOT)


def environment_error(error: BaseException, root: Path | None = None) -> DockbuildError | None:
    """The clear error for a cache root that cannot be made or written (read-only HOME, a
    file in the way, a full disk), naming the path and the fix; None for other errors."""
    from dockbuild.errors import DockbuildError

    root = (root or default_root()).absolute()
    if _disk_full(error):
        where = getattr(error, "filename", None)
        return DockbuildError(
            f"no space left on device (writing {where})" if where else
            f"no space left on device (the cache is at {root})",
            hint=f"free space (`dockbuild prune` empties the cache at {root}), "
            "or set DOCKBUILD_ROOT to a file system with room",
        )
    if not isinstance(error, OSError) or not error.filename:
        return None
    path = Path(os.fsdecode(error.filename)).absolute()
    if not (path == root or root in path.parents or path in root.parents):
        return None  # not the cache's path: some other file's problem
    if error.errno in _DENIED:
        return DockbuildError(
            f"cannot write the cache at {root}: {path}: {error.strerror}", hint=_FIX_ROOT
        )
    if error.errno in _IN_THE_WAY:
        blocker = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), path)
        return DockbuildError(
            f"cannot use {root} as the cache: {blocker} is not a directory",
            hint=f"remove {blocker}, or {_FIX_ROOT}",
        )
    return None


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in _FULL
    # SQLite says it in words ("database or disk is full", SQLITE_FULL).
    return type(error).__module__ == "sqlite3" and "disk is full" in str(error)
