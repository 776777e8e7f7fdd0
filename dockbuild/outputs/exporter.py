"""The Exporter interface: take the solved result of a build, write it where one output says.

One module per output type implements it (``local``, ``tar``, ``docker``, ``oci``, and
``push`` for ``image``/``registry``); :mod:`dockbuild.outputs.export` picks one by type.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from dockbuild.engine.store import Store
    from dockbuild.outputs.spec import OutputSpec
    from dockbuild.progress import Progress


# Named tuples and a plain class, not dataclasses: a cached export loads this module, and
# the dataclasses module is a large part of its start-up.


class Image(NamedTuple):
    """The solved result: the final state's layers and the image config."""

    state: tuple[str, ...]
    config: dict[str, Any]
    base_layers: int = 0  # how many of the layers come from the base image, unchanged
    epoch: int | None = None  # SOURCE_DATE_EPOCH
    squash: bool = False
    # The registry images the build read (docker-image://REF@DIGEST, see registry_sources):
    # a push to their registry mounts their layers from their repository.
    sources: tuple[str, ...] = ()
    # The `created` time of each history entry the build added, by index (None: the
    # export's own time); SOURCE_DATE_EPOCH overrides them (see export.history_times).
    history_times: Mapping[int, str | None] = {}  # never changed: no default is shared writably


class ExportIds(NamedTuple):
    """What the image outputs made: for ``--iidfile``, ``--metadata-file`` and ``-q``."""

    image_id: str | None = None  # config digest
    manifest_digest: str | None = None
    descriptor: dict[str, Any] | None = None
    names: Sequence[str] = ()


class ExportRun:
    """One build's exports: what every exporter gets, and the ids they found (set by
    the image exporters)."""

    __slots__ = ("store", "images", "progress", "now", "ids")

    def __init__(self, store: Store, images: dict[str, Image], progress: Progress, now: str) -> None:
        self.store = store
        self.images = images  # by platform (normalised), in the order asked for
        self.progress = progress
        self.now = now  # one `created` time for every output of the build: the same image
        self.ids = ExportIds()

    @property
    def image(self) -> Image:
        """The image of a single-platform build (the first platform's)."""
        return next(iter(self.images.values()))

    @property
    def multi_platform(self) -> bool:
        """Several platforms: an image index, or one directory / tar entry per platform."""
        return len(self.images) > 1


class Exporter(Protocol):
    """Writes the solved result where one output spec says."""

    def export(self, run: ExportRun, spec: OutputSpec) -> None: ...

    def close(self) -> None:
        """Release what the exports of this build shared (a registry connection)."""


def destination(spec: OutputSpec) -> dict[str, Any]:
    """``out=`` stdout, or ``dest=`` the file :func:`dockbuild.atomic.output_file` writes."""
    import sys

    if spec.dest is None or spec.dest == "-":
        return {"out": sys.stdout.buffer}
    return {"dest": Path(spec.dest)}
