"""Snapshotters: a RUN step's rootfs from a chain of layers, and its changes as a layer.

One interface, one module per implementation (DESIGN.md, "Seams to keep"): ``overlay``
(kernel overlayfs, which the executor mounts in the container's own mount namespace),
``copy`` (a plain copy, compared with its parent afterwards, where nothing can be
mounted) and ``fuse_overlay`` (the fuse-overlayfs program, where overlayfs refuses the
cache root); :mod:`.probe` picks one per cache root. Whatever the
implementation, the step's changes end up in the work dir's ``upper`` in overlay format
(whiteouts as 0:0 character devices, opaque directories by xattr), which the solver
commits as the step's layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dockbuild.engine.executor import Executor, OverlayRootfs, PlainRootfs


class StepRoot(Protocol):
    """A prepared rootfs for one step."""

    @property
    def rootfs(self) -> OverlayRootfs | PlainRootfs:
        """What the executor runs the step on."""
        ...

    def commit(self) -> None:
        """After a successful run: leave the step's changes in the upper dir."""
        ...

    def release(self, layers: tuple[Path, ...] | None) -> None:
        """The step is over, its layer committed: the rootfs is now ``layers`` merged
        (None: the step failed or was cancelled)."""
        ...


class Snapshotter(Protocol):
    name: str

    def prepare(self, layers: tuple[Path, ...], work: Path) -> StepRoot:
        """A rootfs for a step on ``layers`` (bottom first). ``work`` holds the empty
        dirs ``upper`` (which receives the step's changes) and ``work``."""
        ...


def for_executor(executor: Executor, root: Path) -> Snapshotter:
    """The snapshotter for RUN steps whose work dirs are in the cache root ``root``:
    probed there (:mod:`.probe`): overlay, else fuse-overlayfs, else copy."""
    from dockbuild.engine.snapshotter.probe import verdict

    return by_name(verdict(root, executor.mounts).name, root)


def by_name(name: str, root: Path) -> Snapshotter:
    """The snapshotter ``name`` for the cache root ``root``."""
    if name == "overlay":
        from dockbuild.engine.snapshotter.overlay import OverlaySnapshotter

        return OverlaySnapshotter()
    if name == "fuse-overlayfs":
        from dockbuild.engine.snapshotter.fuse_overlay import FuseOverlaySnapshotter

        return FuseOverlaySnapshotter()
    from dockbuild.engine.snapshotter.copy import CopySnapshotter

    return CopySnapshotter(root)
