"""Why a step missed the cache: the inputs a key was made of, and how they changed.

Every record keeps a fingerprint of what its key was computed from: the op's own
definition (commands, env and build args as name + hash, never values), the keys and
names of the steps it reads, the base image it starts from and, for a COPY from a local
context, a short digest per file it selected. When a step misses, the most recent record
of a step with the same name is compared with today's fingerprint, and the difference is
said in words: which context files, which build args or env, which parent step, which
base image digest.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from typing import Any

from dockbuild import llb
from dockbuild.engine.cachekeys import CacheKeys
from dockbuild.engine.store import Record, Store

MAX_FILES = 20000  # past this many files a COPY's fingerprint keeps only their count
_SHOWN = 8  # names listed before "and N more"


def fingerprint(op: llb.Op, keys: CacheKeys, key_of: Callable[[llb.Op | None], str]) -> dict[str, Any]:
    """What ``op``'s key is made of, small enough to keep with its record."""
    definition = _strip_inputs(op.definition())
    if isinstance(op, llb.ExecOp):
        definition["env"] = [_hide_value(e) for e in op.env]
    parents = []
    for i in op.inputs():
        if isinstance(i, llb.SourceOp) and i.identifier.startswith("local://"):
            continue
        parent = {"key": key_of(i), "name": (getattr(i, "name", "") or type(i).__name__) if i else "scratch"}
        if isinstance(i, llb.SourceOp):
            parent["identifier"] = i.identifier  # a base image, pinned by digest
        parents.append(parent)
    files: list[dict[str, Any]] = []
    if isinstance(op, llb.FileOp):
        for action in op.actions:
            if isinstance(action, llb.Copy) and (sel := keys.copy_selection(action)):
                local, rels = sel
                files.append({"src": action.src, "entries": _file_entries(local, rels)})
    return {"op": definition, "parents": parents, "files": files}


def previous(store: Store, name: str) -> Record | None:
    """The most recent record of a step with this name that has a fingerprint."""
    for record in store.records_described(name):
        if record.inputs is not None:
            return record
    return None


def reasons(now: dict[str, Any], before: Record | None) -> list[str]:
    """Today's fingerprint against an earlier record's, in words."""
    if before is None or before.inputs is None:
        return ["no earlier build of this step is in the cache (new or changed instruction, or pruned)"]
    old = before.inputs
    out: list[str] = []
    op_now, op_old = now.get("op", {}), old.get("op", {})
    if op_now.get("identifier") != op_old.get("identifier") and "identifier" in op_now:
        out.append(f"base image changed: {op_old.get('identifier')} -> {op_now.get('identifier')}")
    env_now, env_old = set(op_now.get("env") or []), set(op_old.get("env") or [])
    if env_now != env_old:
        names_now = {e.split("=", 1)[0]: e for e in env_now}
        names_old = {e.split("=", 1)[0]: e for e in env_old}
        changed = sorted(n for n in names_now.keys() | names_old.keys() if names_now.get(n) != names_old.get(n))
        out.append("build args / env changed: " + _listing(changed))
    for field in sorted(op_now.keys() | op_old.keys()):
        if field in ("env", "identifier") or op_now.get(field) == op_old.get(field):
            continue
        out.append(f"instruction {field} changed")
    parents_now, parents_old = now.get("parents", []), old.get("parents", [])
    for i, parent in enumerate(parents_now):
        prior = parents_old[i] if i < len(parents_old) else None
        if prior is None or prior.get("key") != parent.get("key"):
            if prior is not None and "identifier" in parent and prior.get("identifier") != parent["identifier"]:
                out.append(f"base image changed: {prior.get('identifier')} -> {parent['identifier']}")
            else:
                out.append(f"parent step changed: {parent.get('name')}")
    files_now, files_old = now.get("files", []), old.get("files", [])
    for i, sel in enumerate(files_now):
        prior = files_old[i] if i < len(files_old) else {"entries": {}}
        a, b = prior.get("entries", {}), sel.get("entries", {})
        if a == b:
            continue
        if "__count__" in a or "__count__" in b:
            out.append(f"context files changed under {sel['src']} (too many to list)")
            continue
        added = sorted(b.keys() - a.keys())
        removed = sorted(a.keys() - b.keys())
        modified = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
        parts = []
        if modified:
            parts.append("changed " + _listing(modified))
        if added:
            parts.append("added " + _listing(added))
        if removed:
            parts.append("removed " + _listing(removed))
        out.append("context files: " + "; ".join(parts))
    return out or ["the inputs look the same as the last record's; an input not fingerprinted changed"]


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    more = len(names) - _SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _hide_value(entry: str) -> str:
    name, sep, value = entry.partition("=")
    return f"{name}={hashlib.sha256(value.encode()).hexdigest()[:16]}" if sep else name


def _strip_inputs(definition: dict[str, Any]) -> dict[str, Any]:
    """An op's definition without its inputs' digests (parents are compared by key)."""
    out = {}
    for k, v in definition.items():
        if k in ("base", "states", "op"):
            continue
        if k == "mounts":
            v = [{mk: mv for mk, mv in m.items() if mk != "input"} for m in v]
        elif k == "actions":
            v = [{ak: av for ak, av in a.items() if ak != "source"} for a in v]
        out[k] = v
    return out


def _file_entries(local: Any, rels: list[str]) -> dict[str, str]:
    entries: dict[str, str] = {}
    for rel in rels:
        todo = [rel]
        p = local.host_path(rel)
        if os.path.lexists(p) and stat.S_ISDIR(os.lstat(p).st_mode):
            todo += list(local.walk(rel))
        for path in todo:
            if len(entries) >= MAX_FILES:
                return {"__count__": str(len(entries))}
            line = local._entry(path, path)  # the same line the cache key hashes
            entries[path or "."] = hashlib.sha256(line).hexdigest()[:16]
    return entries
