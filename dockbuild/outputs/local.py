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


def _layers(snapshot: Snapshot | Sequence[Path]) -> Sequence[Path]:
    return snapshot.layers if isinstance(snapshot, Snapshot) else snapshot


def write_rootfs(snapshot: Snapshot | Sequence[Path], target: Path) -> None:
    """Copy the merged view of ``snapshot`` into the existing empty directory ``target``."""
    as_root = os.geteuid() == 0
    links: dict[tuple[int, int], str] = {}
    dir_times: list[tuple[str, os.stat_result]] = []
    for rel, src in walk_merged(_layers(snapshot)):
        st = os.lstat(src)
        dst = os.path.join(target, rel)
        mode = st.st_mode
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in links:
                os.link(links[key], dst, follow_symlinks=False)
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


def export_local(snapshot: Snapshot | Sequence[Path], dest: Path) -> None:
    """Write the merged rootfs of ``snapshot`` to the directory ``dest`` (a symlink to a
    directory is followed; anything else but a directory there is refused)."""
    dest = output_dir(Path(dest)).absolute()
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)
        write_rootfs(snapshot, tmp)
        if not dest.exists() or not any(dest.iterdir()):
            if dest.exists():
                dest.rmdir()
            os.rename(tmp, dest)
            return
        _merge_into(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class LocalExporter:
    """``type=local``: the final root filesystem into ``dest``."""

    def export(self, run: ExportRun, spec: OutputSpec) -> None:
        vertex = run.progress.vertex(f"exporting to client directory {spec.dest}")
        export_local(run.store.unpacked_paths(run.image.state), Path(spec.dest or "."))
        vertex.done()

    def close(self) -> None:
        pass
