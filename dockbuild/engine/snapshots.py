"""Snapshots: ordered chains of overlay-format layer directories, read without mounting.

The engine mounts a chain with kernel overlayfs to run a step; everything that only
*reads* a snapshot (exporters, COPY --from sources, USER lookups in /etc/passwd) uses the
merged view computed here, the way overlayfs would present it:

- the topmost layer that has a path provides it;
- a whiteout (char device 0:0) hides the path, and everything under it, in lower layers;
- an opaque directory hides the lower layers' contents of that directory;
- a non-directory in a higher layer hides a lower directory of the same name, and a
  directory merges with lower directories until one of those rules stops it.

Symlinks met on the way are resolved inside the rootfs, as in a chroot: ``..`` stops at
the root and absolute targets start again from the root, so no lookup escapes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from dockbuild.engine.archive import is_opaque_dir, is_whiteout
from dockbuild.errors import DockbuildError

# Linux's limit on symlinks followed in one path resolution (ELOOP beyond).
MAX_SYMLINKS = 40

Layers = Sequence[Path]


class Snapshot(NamedTuple):
    """A filesystem as a chain of layer directories, bottom first (a named tuple: a
    cached tar or local export loads this module, and no dataclasses module then)."""

    layers: tuple[Path, ...]

    def lookup(self, path: str) -> Path | None:
        return lookup(self.layers, path)

    def resolve(self, path: str, follow_final: bool = True) -> str:
        return resolve_in_rootfs(self.layers, path, follow_final)

    def read_file(self, path: str) -> bytes | None:
        return read_file(self.layers, path)

    def list_dir(self, path: str) -> list[str]:
        return list_dir(self.layers, path)

    def walk(self) -> Iterator[tuple[str, Path]]:
        return walk_merged(self.layers)


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


def _visible(layers: Layers, parts: Sequence[str]) -> Path | None:
    """The layer file shown at ``parts``, taking no symlinks into account."""
    if not layers:
        return None
    if not parts:
        return layers[-1]
    for layer in reversed(layers):
        blocked = False  # an opaque ancestor here hides every lower layer
        current = str(layer)
        for depth, name in enumerate(parts, start=1):
            current = os.path.join(current, name)
            try:
                st = os.lstat(current)
            except (FileNotFoundError, NotADirectoryError):
                if blocked:
                    return None
                break  # nothing here: look in the next lower layer
            if is_whiteout(st):
                return None
            if depth == len(parts):
                return Path(current)
            if not stat.S_ISDIR(st.st_mode):
                return None  # a file here replaces the lower directory
            if is_opaque_dir(current):
                blocked = True
    return None


def resolve_in_rootfs(layers: Layers, path: str, follow_final: bool = True) -> str:
    """Resolve the symlinks of ``path`` inside the merged rootfs, chroot-style.

    Returns the resolved path relative to the root ("" for the root itself). A missing
    component is kept as it is, so the result names where the path would be.
    """

    def link_target(parts: Sequence[str]) -> str | None:
        found = _visible(layers, parts)
        return os.readlink(found) if found is not None and found.is_symlink() else None

    return resolve_links(path, link_target, follow_final)


def resolve_links(
    path: str, link_target: Callable[[Sequence[str]], str | None], follow_final: bool = True
) -> str:
    """Resolve the symlinks of ``path`` in a tree that ``link_target`` describes (the
    target of the symlink at the given components, None where there is none): ``..``
    and absolute targets stop at the tree's root, as in a chroot. Returns the resolved
    path relative to the root, missing components kept as they are."""
    pending = list(reversed(_components(path)))
    resolved: list[str] = []
    followed = 0
    while pending:
        name = pending.pop()
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        if follow_final or pending:
            target = link_target([*resolved, name])
            if target is not None:
                followed += 1
                if followed > MAX_SYMLINKS:
                    raise DockbuildError(f"too many levels of symbolic links in {path!r}")
                if target.startswith("/"):
                    resolved = []
                pending.extend(reversed(_components(target)))
                continue
        resolved.append(name)
    return "/".join(resolved)


def lookup(layers: Layers, path: str) -> Path | None:
    """The layer file visible at ``path`` (a final symlink is returned, not followed)."""
    resolved = resolve_in_rootfs(layers, path, follow_final=False)
    return _visible(layers, _components(resolved))


def read_file(layers: Layers, path: str) -> bytes | None:
    """The contents of the regular file at ``path`` (symlinks followed), else None."""
    found = _visible(layers, _components(resolve_in_rootfs(layers, path)))
    if found is None or not stat.S_ISREG(os.lstat(found).st_mode):
        return None
    return found.read_bytes()


def _root_sources(layers: Layers) -> list[str]:
    """The layer roots that contribute to the merged root, topmost first."""
    sources: list[str] = []
    for layer in reversed(layers):
        sources.append(str(layer))
        if is_opaque_dir(layer):
            break
    return sources


def _child_sources(sources: list[str], name: str) -> list[str]:
    """The directories named ``name`` under ``sources`` that merge into one, topmost first."""
    out: list[str] = []
    for source in sources:
        path = os.path.join(source, name)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISDIR(st.st_mode):
            break  # a file or whiteout hides everything lower still
        out.append(path)
        if is_opaque_dir(path):
            break
    return out


def list_dir(layers: Layers, path: str) -> list[str]:
    """The names visible in the directory at ``path`` (symlinks followed), sorted.

    Empty when ``path`` is missing or not a directory.
    """
    sources = _root_sources(layers)
    for name in _components(resolve_in_rootfs(layers, path)):
        sources = _child_sources(sources, name)
        if not sources:
            return []
    seen: dict[str, bool] = {}  # name -> visible (the topmost entry decides)
    for source in sources:
        with os.scandir(source) as it:
            for entry in it:
                if entry.name not in seen:
                    seen[entry.name] = not is_whiteout(entry.stat(follow_symlinks=False))
    return sorted((n for n, visible in seen.items() if visible), key=os.fsencode)


def walk_merged(layers: Layers) -> Iterator[tuple[str, Path]]:
    """Every visible path of the merged view with the layer file that provides it.

    Paths are relative ("etc/passwd"), sorted by bytes within each directory with
    parents before children; the root itself is not yielded.
    """
    sources = _root_sources(layers)
    if sources:
        yield from _walk(sources, "")


def visible_entry(layers: Layers, rel: str) -> Path | None:
    """The layer file shown at the relative path ``rel``, no symlink followed."""
    return _visible(layers, _components(rel))


def walk_subtree(layers: Layers, rel: str) -> Iterator[tuple[str, Path]]:
    """:func:`walk_merged` for the entry at ``rel`` (no symlink followed) and below it,
    ``rel`` itself first."""
    top = visible_entry(layers, rel)
    if top is None:
        return
    yield rel, top
    sources = _root_sources(layers)
    for name in _components(rel):
        sources = _child_sources(sources, name)
    if sources:
        yield from _walk(sources, rel)


def _walk(sources: list[str], rel: str) -> Iterator[tuple[str, Path]]:
    # name -> the entries of that name, topmost layer first
    merged: dict[str, list[os.DirEntry[str]]] = {}
    for source in sources:
        try:
            with os.scandir(source) as it:
                for entry in it:
                    merged.setdefault(entry.name, []).append(entry)
        except (FileNotFoundError, NotADirectoryError):
            continue
    for name in sorted(merged, key=os.fsencode):
        entries = merged[name]
        top = entries[0]
        st = top.stat(follow_symlinks=False)
        if is_whiteout(st):
            continue
        child = f"{rel}/{name}" if rel else name
        yield child, Path(top.path)
        if not stat.S_ISDIR(st.st_mode):
            continue
        child_sources: list[str] = []
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                break  # a file or whiteout below hides everything lower still
            child_sources.append(entry.path)
            if is_opaque_dir(entry.path):
                break
        yield from _walk(child_sources, child)
