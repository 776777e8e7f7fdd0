"""Cache keys: what makes a step's result reusable.

key(op) = sha256(op digest, the keys of its inputs, the content checksums of what it
reads from a local context). The op digest already pins image sources by manifest
digest and holds commands, env and flags; content checksums cover only the context
files a COPY selects, so editing an unrelated file misses nothing. An HTTP source is
keyed by the sha256 of its content (a ``--checksum`` needs no download) and its
Last-Modified time, a git source by the commit its ref resolves to. Secrets and cache
mount contents never enter a key.
"""

from __future__ import annotations

import hashlib
import posixpath
import threading
from typing import TYPE_CHECKING, Any, TypeGuard

from dockbuild import llb
from dockbuild.engine.sources.local import LocalDir, has_glob

if TYPE_CHECKING:
    from dockbuild.engine.store import Store

REMOTE_PREFIXES = ("http://", "https://", "git://")


def is_remote(op: llb.Op | None) -> TypeGuard[llb.SourceOp]:
    """An HTTP(S) or git source (``ADD URL``), fetched by the engine."""
    return isinstance(op, llb.SourceOp) and op.identifier.startswith(REMOTE_PREFIXES)


def _h(*parts: str) -> str:
    return "sha256:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


def combine(*parts: str) -> str:
    """A key made of other keys and values."""
    return _h(*parts)


def layer_id(key: str) -> str:
    """The directory name of the layer a step with this key produced (short: overlay
    mount options are limited to one page)."""
    return key.partition(":")[2][:20]


class CacheKeys:
    def __init__(self, locals_: dict[str, LocalDir], store: Store | None = None) -> None:
        self._locals = locals_
        self._store = store
        self.secrets: dict[str, Any] = {}  # HTTP auth secrets: in requests, never in keys
        self._memo: dict[str, str] = {}
        self._lock = threading.Lock()

    def key(self, op: llb.Op | None) -> str:
        if op is None:
            return "scratch"
        with self._lock:
            hit = self._memo.get(op.digest)
        if hit is not None:
            return hit
        if isinstance(op, llb.SourceOp) and op.identifier.startswith("local://"):
            local = self._local(op)
            key = _h(op.digest, local.checksum([""]))
        elif is_remote(op):
            key = _h(op.digest, self._remote_key(op))
        elif isinstance(op, llb.FileOp):
            parts = [op.digest, self.key(op.base)]
            for action in op.actions:
                if isinstance(action, llb.Copy):
                    parts.append(self._copy_source_key(action))
            key = _h(*parts)
        else:
            key = _h(op.digest, *(self.key(i) for i in op.inputs()))
        with self._lock:
            self._memo[op.digest] = key
        return key

    def _remote_key(self, op: llb.SourceOp) -> str:
        if self._store is None:
            raise RuntimeError("remote sources need a store")
        if op.identifier.startswith("git://"):
            from dockbuild.engine.sources import git

            return git.content_key(op)
        from dockbuild.engine.sources import http

        return http.content_key(op, self._store, self.secrets)

    def _local(self, op: llb.SourceOp) -> LocalDir:
        return self._locals[op.identifier[len("local://") :]]

    def copy_selection(self, action: llb.Copy) -> tuple[LocalDir, list[str]] | None:
        """The context and the paths in it a COPY from a local context reads."""
        source = action.source
        if not (isinstance(source, llb.SourceOp) and source.identifier.startswith("local://")):
            return None
        local = self._local(source)
        src = action.src.strip("/")
        if action.parents and action.include:
            # --parents: only what the patterns below the pivot select
            rels = []
            for pattern in action.include:
                full = posixpath.join(src, pattern).strip("/") if src not in ("", ".") else pattern
                if "**" in pattern:
                    rels.append(src if src != "." else "")  # the whole pivot directory
                elif has_glob(full):
                    rels += local.glob(full)
                elif local.host_path(full).exists():
                    rels.append(full)
        elif action.allow_wildcard and has_glob(src):
            rels = local.glob(src)
        else:
            rels = [src] if src in ("", ".") or local.host_path(src).exists() else []
        return local, ["" if r == "." else r for r in rels]

    def _copy_source_key(self, action: llb.Copy) -> str:
        selection = self.copy_selection(action)
        if selection is None:
            return self.key(action.source)
        local, rels = selection
        # A missing source gets a key too; the copy itself reports it as not found.
        return _h("local", "\0".join(action.exclude), local.checksum(rels) if rels else "none")
