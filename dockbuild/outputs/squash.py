"""``--squash``: the layers a build adds on top of its base, merged into one layer tar.

Each layer is written as an OCI layer tar, then the tars are merged with the whiteout
rules of the image spec: a later entry replaces an earlier one, ``.wh.NAME`` removes
``NAME`` (and its subtree) from the earlier layers and is kept, since it may hide a file
of the base image; ``.wh..wh..opq`` empties its directory of earlier content and is kept
for the same reason. A path whited out and created again becomes the new entry (an
opaque directory, if it is one). The result is sorted by name like every layer we write.
"""

from __future__ import annotations

import contextlib
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from dockbuild.engine import archive
from dockbuild.engine.archive import CountingWriter

_WH = archive.WHITEOUT_PREFIX
_OPQ = archive.OPAQUE_MARKER


def _under(prefix: str, names: Any) -> list[str]:
    return [n for n in names if n == prefix or n.startswith(prefix + "/")]


def write_squashed_tar(
    layers: Sequence[Path], out: BinaryIO, store: Any, *, clamp_mtime: int | None = None
) -> None:
    """Write the layers (overlay-format dirs, bottom first) as one merged layer tar."""
    work = store.tempdir("q")
    try:
        with contextlib.ExitStack() as stack:
            tars: list[tarfile.TarFile] = []
            for i, layer in enumerate(layers):
                path = work / f"{i}.tar"
                with open(path, "wb") as f:
                    archive.write_layer_tar(layer, f, clamp_mtime=clamp_mtime)
                tars.append(stack.enter_context(tarfile.open(path, "r:")))  # noqa: SIM115
            _merge(tars, out)
    finally:
        from dockbuild.engine.store import remove_tree

        remove_tree(work)


def _merge(tars: Sequence[tarfile.TarFile], out: BinaryIO) -> None:
    entries: dict[str, tuple[int, tarfile.TarInfo]] = {}
    whiteouts: dict[str, tarfile.TarInfo] = {}  # hidden path -> its .wh. entry
    opaque: dict[str, tarfile.TarInfo] = {}  # directory -> its opaque marker
    for index, tf in enumerate(tars):
        for ti in tf:
            name = ti.name.rstrip("/")
            head, _, base = name.rpartition("/")
            if base == _OPQ:
                for gone in _under(head, entries):
                    if gone != head and entries[gone][0] < index:
                        del entries[gone]
                for gone in _under(head, list(whiteouts)):
                    if gone != head:
                        del whiteouts[gone]
                opaque[head] = ti
                continue
            if base.startswith(_WH):
                target = f"{head}/{base[len(_WH) :]}" if head else base[len(_WH) :]
                for gone in _under(target, entries):
                    del entries[gone]
                for gone in _under(target, list(whiteouts)):
                    del whiteouts[gone]
                for gone in _under(target, list(opaque)):
                    del opaque[gone]
                whiteouts[target] = ti
                continue
            if name in whiteouts:
                marker = whiteouts.pop(name)
                if ti.isdir():
                    # Created again as a directory: hide the base's content by opacity.
                    opq = tarfile.TarInfo(f"{name}/{_OPQ}")
                    opq.mtime = marker.mtime
                    opaque[name] = opq
            previous = entries.get(name)
            if previous is not None and previous[1].isdir() and not ti.isdir():
                for gone in _under(name, entries):
                    if gone != name:
                        del entries[gone]
            entries[name] = (index, ti)

    rows: list[tuple[bytes, str, tarfile.TarInfo, int | None]] = []
    for name, (index, ti) in entries.items():
        rows.append((name.encode(), name, ti, index))
    for target, ti in whiteouts.items():
        head, _, base = target.rpartition("/")
        name = f"{head}/{_WH}{base}" if head else _WH + base
        rows.append((name.encode(), name, ti, None))
    for directory, ti in opaque.items():
        name = f"{directory}/{_OPQ}" if directory else _OPQ
        rows.append((name.encode(), name, ti, None))
    rows.sort(key=lambda row: row[0])

    written: set[str] = set()
    # CountingWriter is a write-only file object; typeshed wants a full IO for fileobj.
    with tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115
        fileobj=CountingWriter(out),
        mode="w",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tar:
        for _, name, ti, layer in rows:
            info = _copy(ti, name)
            if layer is None:
                info.type = tarfile.REGTYPE
                info.size = 0
                tar.addfile(info)
            elif ti.islnk() and ti.linkname.rstrip("/") not in written:
                # The link's target is gone or comes later: store the content itself.
                source = tars[layer].getmember(ti.linkname)
                info.type = tarfile.REGTYPE
                info.linkname = ""
                info.size = source.size
                tar.addfile(info, tars[layer].extractfile(source))
            elif ti.isreg():
                tar.addfile(info, tars[layer].extractfile(ti))
            else:
                tar.addfile(info)
            written.add(name)


def _copy(ti: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    for attr in ("mode", "uid", "gid", "size", "mtime", "type", "linkname", "uname", "gname"):
        setattr(info, attr, getattr(ti, attr))
    info.devmajor, info.devminor = ti.devmajor, ti.devminor
    info.pax_headers = {k: v for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    return info
