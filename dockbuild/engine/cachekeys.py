"""Cache keys: what makes a step's result reusable.

key(op) = sha256(op digest, the keys of its inputs, the content checksums of what it
reads from a local context). The op digest already pins image sources by manifest
digest and holds commands, env and flags; content checksums cover only the context
files a COPY selects, so editing an unrelated file misses nothing. Secrets and cache
mount contents never enter a key.
"""

from __future__ import annotations

import hashlib
import threading

from dockbuild import llb
from dockbuild.engine.sources.local import LocalDir, has_glob


def _h(*parts: str) -> str:
    return "sha256:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


def layer_id(key: str) -> str:
    """The directory name of the layer a step with this key produced (short: overlay
    mount options are limited to one page)."""
    return key.partition(":")[2][:20]


class CacheKeys:
    def __init__(self, locals_: dict[str, LocalDir]) -> None:
        self._locals = locals_
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

    def _local(self, op: llb.SourceOp) -> LocalDir:
        return self._locals[op.identifier[len("local://") :]]

    def _copy_source_key(self, action: llb.Copy) -> str:
        source = action.source
        if not (isinstance(source, llb.SourceOp) and source.identifier.startswith("local://")):
            return self.key(source)
        local = self._local(source)
        src = action.src.strip("/")
        if action.allow_wildcard and has_glob(src):
            rels = local.glob(src)
        else:
            rels = [src] if src in ("", ".") or local.host_path(src).exists() else []
        rels = ["" if r == "." else r for r in rels]
        # A missing source gets a key too; the copy itself reports it as not found.
        return _h("local", "\0".join(action.exclude), local.checksum(rels) if rels else "none")
