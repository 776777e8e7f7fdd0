"""The overlay snapshotter: the layers as overlayfs lower dirs, the step's changes in
its upper dir (mounted by the executor, inside the container's mount namespace)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dockbuild.engine.executor import OverlayRootfs


@dataclass(frozen=True)
class OverlayStep:
    rootfs: OverlayRootfs

    def commit(self) -> None:
        """Nothing to do: the upper dir holds the changes as the kernel wrote them."""

    def release(self, layers: tuple[Path, ...] | None) -> None:
        """Nothing to keep: the overlay was the container's, gone with it."""


class OverlaySnapshotter:
    name = "overlay"

    def prepare(self, layers: tuple[Path, ...], work: Path) -> OverlayStep:
        lowers = [str(p) for p in reversed(layers)]
        if not lowers:  # overlayfs needs at least one lower dir: FROM scratch
            (work / "empty").mkdir()
            lowers = [str(work / "empty")]
        return OverlayStep(OverlayRootfs(tuple(lowers), str(work / "upper"), str(work / "work")))
