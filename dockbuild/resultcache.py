"""The build-level result record: a rebuild with nothing changed goes straight to the outputs.

One row per build request in the cache db (table ``results``, in the store's ``db.sqlite``,
WAL): its key digests what the build was asked and what it read that is known before the
Dockerfile is converted (the Dockerfile's bytes, .dockerignore, the build options, the
named contexts, OCI layout indexes, the config file, the dockbuild version); its value is
the solved image, and what the build read that is only known after conversion, checked
on every use: the tree digest of each local context the build read, and the manifest
digest each base image tag resolved to. A row whose checks fail is a miss, and the build
runs as always (step by step, from the cache). docs/cache.md says what the key covers.

This module loads nothing of the frontend, the solver or the registry client: a build
that finds its result here never imports them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from dockbuild.engine.sources.local import LocalDir
    from dockbuild.engine.store import Store

# Bumped whenever what a row holds, or what decides a result, changes meaning.
FORMAT = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,   -- digest of the build request (request_key)
    data TEXT NOT NULL,     -- JSON: a Result
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
"""


class Result(NamedTuple):
    """A solved build: the image, and what must still hold for it to be the answer.

    A named tuple, not a frozen dataclass: this module loads on every no-op rebuild,
    where a dataclass's creation (~0.8 ms) is a noticeable part of the whole."""

    image: dict[str, Any]  # the fields of outputs.exporter.Image
    contexts: dict[str, str]  # local context name -> its tree digest when the build read it
    resolutions: list[tuple[str, str, str]]  # (tag reference, platform, manifest digest)
    steps: list[str]  # the steps' names, shown CACHED when the result is used
    warnings: list[str]  # the Dockerfile's warnings, shown again
    records: list[str]  # the keys of the steps' cache records, marked used on each use

    def to_json(self) -> str:
        return json.dumps(
            {
                "image": self.image,
                "contexts": self.contexts,
                "resolutions": self.resolutions,
                "steps": self.steps,
                "warnings": self.warnings,
                "records": self.records,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Result:
        data = json.loads(text)
        return cls(
            image=data["image"],
            contexts=data["contexts"],
            resolutions=[(r[0], r[1], r[2]) for r in data["resolutions"]],
            steps=list(data["steps"]),
            warnings=list(data["warnings"]),
            records=list(data["records"]),
        )


def request_key(fields: dict[str, Any]) -> str:
    """The digest of what decides a result and is known before conversion (``fields``,
    JSON-able), with the record format, the dockbuild version and its code's stamp."""
    from dockbuild import __version__

    doc = {"format": FORMAT, "version": __version__, "code": code_stamp(), "request": fields}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def code_stamp() -> str:
    """A digest of the name, size and mtime of each of dockbuild's own source files.

    The version alone is not enough: an editable install (a developer's checkout, a CI
    job testing a branch) runs new code under the same version, and a result the old
    code made must not answer for it. A stat of each file (about a hundred, ~0.3 ms) is
    cheaper than reading them. An installed package (in site-packages) changes only when
    it is installed again, which writes its files anew: its stamp is its place and the
    stat data of its ``__init__.py``.
    """
    package = os.path.dirname(os.path.abspath(__file__))
    if os.path.basename(os.path.dirname(package)) in ("site-packages", "dist-packages"):
        st = os.stat(os.path.join(package, "__init__.py"))
        return f"{package}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    h = hashlib.sha256()
    todo = [package]
    while todo:
        top = todo.pop()
        with os.scandir(top) as it:
            for entry in sorted(it, key=lambda e: e.name):
                if entry.name.endswith(".py"):
                    st = entry.stat(follow_symlinks=True)
                    h.update(b"%s\0%d\0%d\n" % (os.fsencode(entry.path[len(package) :]), st.st_size, st.st_mtime_ns))
                elif entry.is_dir(follow_symlinks=False) and entry.name != "__pycache__":
                    todo.append(entry.path)
    return h.hexdigest()


def file_digest(path: Path) -> str | None:
    """The digest of a small file's bytes (an OCI index, the config file); None if absent."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def context_digests(locals_: dict[str, LocalDir], names: list[str]) -> dict[str, str] | None:
    """The tree digest of each named local context (a stat walk when unchanged: see
    LocalDir); None when one of them is not a local context of this build."""
    if any(name not in locals_ for name in names):
        return None
    return {name: locals_[name].checksum([""]) for name in names}


class ResultCache:
    """The ``results`` table of one cache root."""

    def __init__(self, db_path: Path) -> None:
        self._conn = sqlite3.connect(db_path, timeout=60, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error:
            self._conn.close()
            raise

    def get(self, key: str) -> Result | None:
        """The row of ``key``, if any and readable (a damaged row is a miss)."""
        try:
            with self._lock:
                row = self._conn.execute("SELECT data FROM results WHERE key=?", (key,)).fetchone()
            return Result.from_json(row[0]) if row is not None else None
        except (sqlite3.Error, ValueError, KeyError, TypeError, IndexError):
            return None

    def put(self, key: str, result: Result) -> None:
        """Record (or replace) the result of ``key``: one statement, so a reader sees the
        old row or the new one. Only a speed-up: a busy or read-only cache is no error."""
        now = time.time()
        try:
            with self._lock:
                self._conn.execute(
                    "INSERT OR REPLACE INTO results(key, data, created, last_used) VALUES (?,?,?,?)",
                    (key, result.to_json(), now, now),
                )
        except sqlite3.Error:
            pass

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def prune(db_path: Path, has_layer: Callable[[str], bool], everything: bool = False) -> int:
    """Delete the rows that can no longer answer (an image layer is gone from the cache),
    or every row with ``everything``; the number deleted. Called by prune and GC while
    they hold the cache exclusively (engine/gc.py), after their sweep."""
    conn = sqlite3.connect(db_path, timeout=60, isolation_level=None)
    try:
        conn.executescript(_SCHEMA)
        if everything:
            return conn.execute("DELETE FROM results").rowcount
        dead = []
        for key, data in conn.execute("SELECT key, data FROM results").fetchall():
            try:
                layers = Result.from_json(data).image.get("state", [])
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                layers = None  # a damaged row answers nothing
            if layers is None or not all(has_layer(layer) for layer in layers):
                dead.append((key,))
        conn.executemany("DELETE FROM results WHERE key=?", dead)
        return len(dead)
    finally:
        conn.close()


def still_valid(result: Result, store: Store, locals_: dict[str, LocalDir]) -> bool:
    """Whether what the result was made from still holds: every layer of the image is in
    the cache, each tag resolves (in the cache's table) to the same manifest, and each
    local context the build read has the same tree digest."""
    state = result.image.get("state", [])
    if not all(store.has_layer(layer) for layer in state):
        return False
    for ref, platform, digest in result.resolutions:
        if store.get_resolution(ref, platform) != digest:
            return False
    return context_digests(locals_, list(result.contexts)) == result.contexts
