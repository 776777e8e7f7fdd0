"""From a solved state to what ``-o`` asked for: the result as an :class:`Image`, and
:func:`export_all`, which hands it to the exporter of each output type.

The exporters live one per module (``local``, ``tar``, ``docker``, ``oci``, ``push``) and
are imported only when a build asks for their type.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from dockbuild.engine.store import Store
from dockbuild.errors import DockbuildError
from dockbuild.outputs.exporter import Exporter, ExportIds, ExportRun, Image
from dockbuild.outputs.spec import OutputSpec
from dockbuild.progress import Progress

__all__ = [
    "base_layer_count",
    "export_all",
    "finish_config",
    "history_times",
    "registry_sources",
    "source_date_epoch",
]


def registry_sources(root: Any) -> tuple[str, ...]:
    """The identifiers of the registry images an LLB graph reads (its docker-image sources)."""
    from dockbuild import llb

    return tuple(
        dict.fromkeys(
            op.identifier
            for op in llb.walk(root)
            if isinstance(op, llb.SourceOp) and op.identifier.startswith("docker-image://")
        )
    )


def finish_config(config: dict[str, Any], history_ops: list[Any], solver: Any) -> dict[str, Any]:
    """Mark the history entries of steps that changed nothing as empty layers."""
    config = json.loads(json.dumps(config))
    for entry, op in zip(config.get("history", []), history_ops, strict=True):
        if op is not None and not solver.added_layer(op):
            entry["empty_layer"] = True
    return config


def history_times(
    config: dict[str, Any], history_ops: list[Any], solver: Any
) -> dict[int, str | None]:
    """The ``created`` time of each history entry the build adds (by index), as BuildKit
    sets it: when the entry's layer was made (the cache's record of it), so a rebuild from
    the cache gives the same image. An entry without a layer of its own takes the time of
    the entry before it; None when there is none (the export's own time is used then).
    Entries that carry a time (the base image's) keep it."""
    from dockbuild.outputs.blobs import timestamp

    times: dict[int, str | None] = {}
    previous: str | None = None
    for index, (entry, op) in enumerate(zip(config.get("history", []), history_ops, strict=True)):
        if "created" in entry:
            previous = entry["created"]
            continue
        made = solver.layer_made(op) if op is not None else None
        if made is not None:
            previous = timestamp(made)
        times[index] = previous
    return times


def base_layer_count(config: dict[str, Any], history_ops: list[Any], layers: int) -> int:
    """How many layers of the result are the base image's: its non-empty history entries."""
    count = sum(
        1
        for entry, op in zip(config.get("history", []), history_ops, strict=False)
        if op is None and not entry.get("empty_layer")
    )
    return min(count, layers)


def source_date_epoch(build_args: Mapping[str, str | None]) -> int | None:
    """SOURCE_DATE_EPOCH from ``--build-arg`` (a bare name reads the environment), else env."""
    value: str | None
    if "SOURCE_DATE_EPOCH" in build_args:
        value = build_args["SOURCE_DATE_EPOCH"]
        if value is None:
            value = os.environ.get("SOURCE_DATE_EPOCH")
    else:
        value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    if not value.strip().isdigit():
        raise DockbuildError(
            f"invalid SOURCE_DATE_EPOCH {value!r}: expected seconds since 1970 (an integer)"
        )
    return int(value.strip())


def _local() -> Exporter:
    from dockbuild.outputs.local import LocalExporter

    return LocalExporter()


def _tar() -> Exporter:
    from dockbuild.outputs.tar import TarExporter

    return TarExporter()


def _docker() -> Exporter:
    from dockbuild.outputs.docker import DockerExporter

    return DockerExporter()


def _oci() -> Exporter:
    from dockbuild.outputs.oci import OciExporter

    return OciExporter()


def _registry() -> Exporter:
    from dockbuild.outputs.push import RegistryExporter

    return RegistryExporter()


# The exporter of each output type, made (and its module imported) on first use.
EXPORTERS: dict[str, Callable[[], Exporter]] = {
    "local": _local,
    "tar": _tar,
    "docker": _docker,
    "oci": _oci,
    "image": _registry,
    "registry": _registry,
}


def export_all(
    store: Store, images: Image | dict[str, Image], specs: list[OutputSpec], progress: Progress
) -> ExportIds:
    """Write every output (an image, or one per platform); a failed write is an error
    naming the destination."""
    if isinstance(images, Image):
        images = {"": images}
    try:
        return _export_all(store, images, specs, progress)
    except BrokenPipeError:
        raise  # the CLI ends quietly when stdout's reader went away
    except OSError as e:
        where = e.filename or next((s.dest for s in specs if s.dest not in (None, "-")), "output")
        raise DockbuildError(
            f"exporting to {where}: {(e.strerror or str(e)).lower()}",
            hint="the destination was left as it was",
        ) from e


def _export_all(
    store: Store, images: dict[str, Image], specs: list[OutputSpec], progress: Progress
) -> ExportIds:
    from dockbuild.outputs.blobs import timestamp

    run = ExportRun(store, images, progress, now=timestamp(None))
    exporters: dict[Callable[[], Exporter], Exporter] = {}
    try:
        for spec in specs:
            make = EXPORTERS[spec.type]
            if make not in exporters:
                exporters[make] = make()
            exporters[make].export(run, spec)
    finally:
        for exporter in exporters.values():
            exporter.close()
    return run.ids
