"""The ``type=local`` exporter: the merged rootfs of a snapshot written to a directory.

The tree is first built in a temp directory beside ``dest``, so an interrupted export
never leaves a half-written tree behind. Then:

- ``dest`` missing or empty: the temp directory is renamed to ``dest`` (atomic);
- ``dest`` holding files: the result is merged into it, entry by entry, each by rename.
  Same-named entries are replaced, directories merge, other files are kept. That is what
  BuildKit's local exporter does (it writes into ``dest``), and it keeps
  ``-o type=local,dest=.`` from deleting a user's files;
- ``dest`` a symlink: followed; ``dest`` (or its target) anything but a directory: refused.

Modes, symlinks, hardlinks (within the export) and mtimes are kept; ownership, device
nodes and xattrs (other than overlay's) only when running as root.

An export of the same image into a directory that still holds, untouched, what the last
export wrote there writes nothing (:class:`WrittenTrees`).

Atomic, not synced, like the other exporters (and BuildKit's local exporter): the renames
make the tree appear whole to every reader while the system runs, and the kernel writes
it back in its own time. A ``syncfs`` flushes the whole filesystem, every other
process's writes too, and cost more than the rest of an unchanged rebuild.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dockbuild.atomic import output_dir, replace_dir
from dockbuild.engine.archive import content_xattrs
from dockbuild.engine.snapshots import Snapshot, walk_merged

if TYPE_CHECKING:
    from dockbuild.outputs.exporter import ExportRun
    from dockbuild.outputs.spec import OutputSpec
    from dockbuild.progress import Vertex


def _layers(snapshot: Snapshot | Sequence[Path]) -> Sequence[Path]:
    return snapshot.layers if isinstance(snapshot, Snapshot) else snapshot


def write_rootfs(snapshot: Snapshot | Sequence[Path], target: Path) -> list[str]:
    """Copy the merged view of ``snapshot`` into the existing empty directory ``target``;
    the paths written, relative to it."""
    as_root = os.geteuid() == 0
    links: dict[tuple[int, int], str] = {}
    dir_times: list[tuple[str, os.stat_result]] = []
    written: list[str] = []
    for rel, src in walk_merged(_layers(snapshot)):
        st = os.lstat(src)
        dst = os.path.join(target, rel)
        mode = st.st_mode
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in links:
                os.link(links[key], dst, follow_symlinks=False)
                written.append(rel)
                continue
            links[key] = dst
        if stat.S_ISDIR(mode):
            os.mkdir(dst, 0o700)  # final mode later: a read-only dir still gets children
            dir_times.append((dst, st))
        elif stat.S_ISREG(mode):
            shutil.copyfile(src, dst, follow_symlinks=False)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(dst, 0o600)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            if not as_root:
                continue  # only root can make device nodes
            os.mknod(dst, stat.S_IFMT(mode) | 0o600, st.st_rdev)
        else:
            continue  # sockets do not survive a copy
        written.append(rel)
        if as_root:
            os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
            for name, value in content_xattrs(src).items():
                os.setxattr(dst, name, value, follow_symlinks=False)
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISLNK(mode):
            os.chmod(dst, stat.S_IMODE(mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    for dst, st in reversed(dir_times):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    return written


def _merge_into(src: Path, dest: Path) -> None:
    """Move the entries of ``src`` into the directory ``dest``, replacing same names."""
    for entry in sorted(os.listdir(src)):
        s, d = src / entry, dest / entry
        if s.is_dir() and not s.is_symlink() and d.is_dir() and not d.is_symlink():
            _merge_into(s, d)
            st = os.lstat(s)
            os.chmod(d, stat.S_IMODE(st.st_mode))
            os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
            continue
        if d.is_dir() and not d.is_symlink():
            replace_dir(s, d)
            continue
        os.replace(s, d)


def export_local(
    snapshot: Snapshot | Sequence[Path], dest: Path, written: WrittenTrees | None = None, image: str = ""
) -> None:
    """Write the merged rootfs of ``snapshot`` to the directory ``dest`` (a symlink to a
    directory is followed; anything else but a directory there is refused); with
    ``written``, record what was written there for ``image`` (what identifies the
    snapshot's content)."""
    dest = output_dir(Path(dest)).absolute()
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)
        rels = write_rootfs(snapshot, tmp)
        if not dest.exists() or not any(dest.iterdir()):
            if dest.exists():
                dest.rmdir()
            os.rename(tmp, dest)
        else:
            _merge_into(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if written is not None:
        written.put(dest, image, rels)


def _signature(st: os.stat_result) -> tuple[int, ...]:
    """What tells an entry is as an export left it: the inode, type and mode, and for
    anything but a directory its size, mtime and ctime (a directory's times move when a
    user adds a file of their own beside the export's, which is no change of ours)."""
    if stat.S_ISDIR(st.st_mode):
        return (st.st_ino, st.st_mode)
    return (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class WrittenTrees:
    """What earlier ``type=local`` exports wrote, in the cache db (table
    ``local_exports``, WAL): per destination, the image and the stat signature of every
    entry written. An export of the same image finding every entry as it left it writes
    nothing; any difference (a file edited, removed or replaced, another image) and the
    export is written again as always. Only a speed-up: a busy database is no error."""

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS local_exports (
        dest TEXT PRIMARY KEY,  -- absolute path of the destination directory
        image TEXT NOT NULL,    -- what identifies the exported content (its layer ids)
        data BLOB NOT NULL,     -- marshal: {relative path: stat signature}
        updated REAL NOT NULL
    );
    """

    def __init__(self, db_path: Path) -> None:
        import sqlite3

        self._conn = sqlite3.connect(db_path, timeout=60, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(self._SCHEMA)

    def unchanged(self, dest: Path, image: str) -> bool:
        import marshal
        import sqlite3

        try:
            row = self._conn.execute(
                "SELECT image, data FROM local_exports WHERE dest=?", (str(dest),)
            ).fetchone()
            if row is None or row[0] != image:
                return False
            entries = marshal.loads(row[1])
        except (sqlite3.Error, ValueError, EOFError, TypeError):
            return False
        if not isinstance(entries, dict) or not entries:
            return False
        base = str(dest)
        try:
            return all(
                _signature(os.lstat(os.path.join(base, rel))) == tuple(sig) for rel, sig in entries.items()
            )
        except OSError:
            return False

    def put(self, dest: Path, image: str, rels: list[str]) -> None:
        import marshal
        import sqlite3
        import time

        base = str(dest)
        try:
            entries = {rel: _signature(os.lstat(os.path.join(base, rel))) for rel in rels}
            self._conn.execute(
                "INSERT OR REPLACE INTO local_exports(dest, image, data, updated) VALUES (?,?,?,?)",
                (base, image, marshal.dumps(entries), time.time()),
            )
        except (OSError, sqlite3.Error):
            pass  # another process changed the tree meanwhile: the next export writes it

    def close(self) -> None:
        self._conn.close()


class LocalExporter:
    """``type=local``: the final root filesystem into ``dest``."""

    def __init__(self) -> None:
        self._written: WrittenTrees | None = None

    def export(self, run: ExportRun, spec: OutputSpec) -> None:
        vertex = run.progress.vertex(f"exporting to client directory {spec.dest}")
        if self._written is None:
            self._written = WrittenTrees(run.store.root / "db.sqlite")
        dest = output_dir(Path(spec.dest or ".")).absolute()
        if not run.multi_platform:
            self._export(run, run.image.state, dest, vertex)
        elif spec.flag("platform-split", True):  # one directory per platform: linux_arm64/
            from dockbuild.platforms import path_name

            dest.mkdir(parents=True, exist_ok=True)
            for platform, each in run.images.items():
                self._export(run, each.state, dest / path_name(platform), vertex)
        else:  # merged, a later platform's file over an earlier one's
            for each in run.images.values():
                export_local(run.store.unpacked_paths(each.state), dest)
        vertex.done()

    def _export(self, run: ExportRun, state: tuple[str, ...], dest: Path, vertex: Vertex) -> None:
        assert self._written is not None
        # The same layers (exported by root or not) make the same tree.
        image = f"{int(os.geteuid() == 0)}:" + ",".join(state)
        if self._written.unchanged(dest, image):
            vertex.log("stdout", b"unchanged since the last export of this image: nothing written\n")
        else:
            export_local(run.store.unpacked_paths(state), dest, self._written, image)

    def close(self) -> None:
        if self._written is not None:
            self._written.close()
