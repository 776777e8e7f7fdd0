"""``--iidfile`` and ``--metadata-file``: the image's ids, written like any output file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dockbuild.errors import DockbuildError

if TYPE_CHECKING:
    from dockbuild.outputs.exporter import ExportIds


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as :func:`dockbuild.atomic.output_file` does: atomically
    for a regular file, through a FIFO, device or symlink."""
    from dockbuild.atomic import output_file

    try:
        with output_file(path) as f:
            f.write(data)
    except OSError as e:
        raise DockbuildError(
            f"writing {e.filename or path}: {(e.strerror or str(e)).lower()}",
            hint="the file was left as it was",
        ) from e


def write_metadata(path: Path, ids: ExportIds) -> None:
    """BuildKit's result metadata keys, as JSON."""
    meta: dict[str, Any] = {}
    if ids.image_id:
        meta["containerimage.config.digest"] = ids.image_id
    if ids.manifest_digest:
        meta["containerimage.digest"] = ids.manifest_digest
    if ids.descriptor:
        meta["containerimage.descriptor"] = ids.descriptor
    if ids.names:
        meta["image.name"] = ",".join(ids.names)
    write_atomic(path, json.dumps(meta, indent=2).encode() + b"\n")
