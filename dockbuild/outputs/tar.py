"""The ``type=tar`` exporter: the merged rootfs of a snapshot as one tar stream.

Entries are those of the merged view (whiteouts applied, no overlay xattrs), sorted with
parents first, relative names, numeric ids, PAX; see :class:`TreeTarWriter`. The stream
goes to a file object (stdout) or to a destination file (atomically where it is a regular
file; see :func:`dockbuild.atomic.output_file`).
"""

from __future__ import annotations

import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from dockbuild.atomic import output_file
from dockbuild.engine.archive import TreeTarWriter
from dockbuild.engine.snapshots import Snapshot, walk_merged
from dockbuild.outputs.exporter import destination

if TYPE_CHECKING:
    from dockbuild.outputs.exporter import ExportRun
    from dockbuild.outputs.spec import OutputSpec


def write_rootfs_tar(
    snapshot: Snapshot | Sequence[Path], out: BinaryIO, *, clamp_mtime: int | None = None
) -> None:
    """Write the merged rootfs of ``snapshot`` as a tar stream to ``out``."""
    layers = snapshot.layers if isinstance(snapshot, Snapshot) else snapshot
    with TreeTarWriter(out, clamp_mtime=clamp_mtime) as writer:
        for rel, src in walk_merged(layers):
            writer.add_path(rel, src)
    out.flush()


def write_platforms_tar(
    trees: Mapping[str, Sequence[Path]], out: BinaryIO, *, split: bool = True
) -> None:
    """Several platforms' rootfs as one tar: under a directory each (``linux_arm64/``,
    as BuildKit's platform-split), or merged, a later platform's entry over an earlier
    one's (``split=False``)."""
    from dockbuild.platforms import path_name

    with TreeTarWriter(out) as writer:
        if split:
            for platform, layers in trees.items():
                top = tarfile.TarInfo(path_name(platform))
                top.type, top.mode = tarfile.DIRTYPE, 0o755
                writer.tar.addfile(top)
                for rel, src in walk_merged(layers):
                    writer.add_path(f"{top.name}/{rel}", src)
        else:
            merged: dict[str, Path] = {}
            for layers in trees.values():
                for rel, src in walk_merged(layers):
                    merged[rel] = src  # parents still come first: their place is kept
            for rel, src in merged.items():
                writer.add_path(rel, src)
    out.flush()


def export_tar(
    snapshot: Snapshot | Sequence[Path],
    *,
    out: BinaryIO | None = None,
    dest: Path | None = None,
    clamp_mtime: int | None = None,
) -> None:
    """Export the rootfs tar to ``out`` or to ``dest`` (:func:`output_file`)."""
    if (out is None) == (dest is None):
        raise ValueError("give exactly one of out and dest")
    if out is not None:
        write_rootfs_tar(snapshot, out, clamp_mtime=clamp_mtime)
        return
    with output_file(Path(dest), durable=False) as f:  # type: ignore[arg-type]  # as oci.py
        write_rootfs_tar(snapshot, f, clamp_mtime=clamp_mtime)


class TarExporter:
    """``type=tar``: the final root filesystem as one tar, to ``dest`` or stdout."""

    def export(self, run: ExportRun, spec: OutputSpec) -> None:
        vertex = run.progress.vertex("exporting to client tarball")
        if run.multi_platform:
            trees = {p: run.store.unpacked_paths(i.state) for p, i in run.images.items()}
            split = spec.flag("platform-split", True)
            where = destination(spec)
            if "out" in where:
                write_platforms_tar(trees, where["out"], split=split)
            else:
                with output_file(Path(where["dest"]), durable=False) as f:
                    write_platforms_tar(trees, f, split=split)
        else:
            export_tar(run.store.unpacked_paths(run.image.state), **destination(spec))
        vertex.done()

    def close(self) -> None:
        pass
