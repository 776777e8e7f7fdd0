"""Local sources: the build context (or a named local context) read in place.

Nothing is copied out of a context until a step needs it: COPY reads the files where
they are, and a cache key covers only the files a step selects (name, type, mode, link
target and content; not mtime or owner, as in BuildKit). ``.dockerignore`` patterns and
COPY globs follow Go's ``filepath.Match``; ignore patterns also know ``**`` and ``!``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dockbuild.errors import DockbuildError


def has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[\\")


@functools.lru_cache(maxsize=512)
def _compile(pattern: str, doublestar: bool) -> re.Pattern[str]:
    """Go filepath.Match as a regex (``*`` and ``?`` never cross ``/``)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if doublestar and pattern.startswith("**", i):
            i += 2
            if i < n and pattern[i] == "/":
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            j = i + 1
            negate = j < n and pattern[j] == "^"
            if negate:
                j += 1
            chars: list[str] = []
            while j < n and pattern[j] != "]":
                if pattern[j] == "\\" and j + 1 < n:
                    j += 1
                chars.append(re.escape(pattern[j]) if pattern[j] != "-" else "-")
                j += 1
            if j >= n:
                raise DockbuildError(f"syntax error in pattern {pattern!r}: unclosed '['")
            out.append("[" + ("^/" if negate else "") + "".join(chars) + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def match(pattern: str, name: str) -> bool:
    """Go's filepath.Match."""
    return _compile(pattern, False).match(name) is not None


def glob_paths(
    pattern: str, names: Callable[[str], list[str]], exists: Callable[[str], bool]
) -> list[str]:
    """Paths of a tree matching a COPY source pattern, one component at a time.

    ``names(dir)`` lists a directory (sorted), ``exists(path)`` tests a literal path;
    both take paths relative to the tree's root ("" is the root).
    """
    found = [""]
    for part in (p for p in pattern.strip("/").split("/") if p not in ("", ".")):
        nxt: list[str] = []
        for base in found:
            if has_glob(part):
                nxt += [f"{base}/{n}" if base else n for n in names(base) if match(part, n)]
            else:
                cand = f"{base}/{part}" if base else part
                if exists(cand):
                    nxt.append(cand)
        found = nxt
    return found


def match_path(pattern: str, path: str) -> bool:
    """A .dockerignore-style match of a whole relative path (``*`` stays in one
    component, ``**`` spans any number)."""
    return _compile(pattern, True).match(path) is not None


@dataclass(frozen=True)
class IgnoreRule:
    pattern: str
    exclusion: bool  # a "!pattern" line re-includes


def ignore_rules(patterns: tuple[str, ...]) -> tuple[IgnoreRule, ...]:
    rules = []
    for raw in patterns:
        exclusion = raw.startswith("!")
        pat = raw[1:] if exclusion else raw
        pat = os.path.normpath(pat.strip()).lstrip("/") if pat.strip() else ""
        if pat in ("", "."):
            continue
        rules.append(IgnoreRule(pat, exclusion))
    return tuple(rules)


def is_ignored(rules: tuple[IgnoreRule, ...], rel: str) -> bool:
    """Last match wins; a pattern that matches a parent directory matches its children."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for rule in rules:
        rx = _compile(rule.pattern, True)
        if any(rx.match(p) for p in prefixes):
            result = not rule.exclusion
    return result


class FileDigests:
    """Content digests of context files, keyed by their stat data, kept in the cache db.

    A file whose path, device, inode, size, mode, mtime and ctime are unchanged since it
    was last read is not read again: an unchanged context costs a stat walk. The table
    lives in the store's ``db.sqlite`` (WAL), one row per context directory holding the
    map of its files (one read and one write per build, not one per file), so several
    dockbuild processes share it; the last writer wins, and any row is correct for the
    stat data it records.
    """

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS context_digests (
        root TEXT PRIMARY KEY,  -- absolute host path of a context directory
        data BLOB NOT NULL,     -- marshal: {host path: (dev, ino, size, mode, mtime_ns, ctime_ns, sha256 hex)}
        updated REAL NOT NULL
    )
    """

    def __init__(self, db_path: Path) -> None:
        import sqlite3

        self._conn = sqlite3.connect(
            db_path, timeout=60, check_same_thread=False, isolation_level=None
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(self._SCHEMA)
        self._lock = threading.Lock()
        self._maps: dict[str, dict[str, tuple]] = {}  # root -> its file map
        self._dirty: set[str] = set()

    def load(self, root: Path) -> dict[str, tuple]:
        """The file map of ``root`` (read once per process)."""
        import marshal

        key = str(root)
        with self._lock:
            found = self._maps.get(key)
            if found is not None:
                return found
            row = self._conn.execute("SELECT data FROM context_digests WHERE root=?", (key,)).fetchone()
            data: dict[str, tuple] = {}
            if row is not None:
                with contextlib.suppress(ValueError, EOFError, TypeError):
                    loaded = marshal.loads(row[0])
                    if isinstance(loaded, dict):
                        data = loaded
            self._maps[key] = data
            return data

    def changed(self, root: Path) -> None:
        with self._lock:
            self._dirty.add(str(root))

    def flush(self) -> None:
        import marshal
        import sqlite3

        with self._lock:
            # a copy first: another thread may be adding digests while we write
            todo = [(root, marshal.dumps(dict(self._maps[root]))) for root in self._dirty]
            self._dirty.clear()
            if not todo:
                return
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany(
                    "INSERT OR REPLACE INTO context_digests(root, data, updated) VALUES (?,?,?)",
                    [(root, blob, time.time()) for root, blob in todo],
                )
                self._conn.execute("COMMIT")
            except sqlite3.Error:
                # Only a speed-up: a busy or read-only cache must not fail the build.
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._conn.close()


@dataclass
class LocalDir:
    """A directory on this host offered to the build under a name."""

    path: Path
    excludes: tuple[str, ...] = ()
    digests: FileDigests | None = None  # the persistent digest table, when there is a cache
    _rules: tuple[IgnoreRule, ...] = field(init=False, repr=False)
    _known: dict[str, tuple] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path).absolute()
        self._rules = ignore_rules(self.excludes)
        self._known = self.digests.load(self.path) if self.digests is not None else {}

    def ignored(self, rel: str) -> bool:
        return bool(self._rules) and is_ignored(self._rules, rel)

    def host_path(self, rel: str) -> Path:
        return self.path / rel if rel else self.path

    def reincludes(self, rel: str) -> bool:
        """Whether ``rel``, an ignored directory, holds something a later ``!`` rule
        takes back (``docs`` then ``!docs/keep.md``): it then exists, with only that."""
        if not any(r.exclusion for r in self._rules):
            return False
        if not stat.S_ISDIR(os.lstat(self.host_path(rel)).st_mode):
            return False
        return next(self.walk(rel), None) is not None

    def walk(self, rel: str = "") -> Iterator[str]:
        """Paths below ``rel`` (not ``rel`` itself), sorted, parents first, ignores applied.

        An ignored directory is still entered when a later ``!`` rule may re-include
        something below it, as moby's patternmatcher does.
        """
        for child, _host, _st in self._walk_stat(rel, os.path.join(self.path, rel) if rel else str(self.path)):
            yield child

    def _walk_stat(self, rel: str, host: str) -> Iterator[tuple[str, str, os.stat_result]]:
        """(relative path, host path, lstat) below ``rel``; strings only: this is the
        hot loop of an unchanged rebuild."""
        rules = self._rules
        may_reinclude = any(r.exclusion for r in rules)
        try:
            with os.scandir(host) as it:
                entries = sorted(it, key=lambda e: e.name)
        except NotADirectoryError:
            return
        prefix = rel + "/" if rel else ""
        for entry in entries:
            child = prefix + entry.name
            ignored = bool(rules) and is_ignored(rules, child)
            st = entry.stat(follow_symlinks=False)
            if not ignored:
                yield child, entry.path, st
            if stat.S_ISDIR(st.st_mode) and (not ignored or may_reinclude):
                yield from self._walk_stat(child, entry.path)

    def glob(self, pattern: str) -> list[str]:
        """Context paths matching a COPY source pattern (component by component)."""
        found = glob_paths(
            pattern, self._names, lambda rel: os.path.lexists(self.host_path(rel))
        )
        return [f for f in found if not self.ignored(f)]

    def _names(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.host_path(rel)))
        except (NotADirectoryError, FileNotFoundError):
            return []

    def checksum(self, rels: list[str]) -> str:
        """A digest of what a step would read: each path and, for dirs, all below it."""
        h = hashlib.sha256()
        update = h.update
        entry = self._entry_host
        try:
            for rel in rels:
                host = os.path.join(self.path, rel) if rel else str(self.path)
                st = os.lstat(host)
                update(entry(rel, host, st))
                if stat.S_ISDIR(st.st_mode):
                    cut = len(rel) + 1 if rel else 0
                    for child, child_host, cst in self._walk_stat(rel, host):
                        update(entry(child[cut:], child_host, cst))
        finally:
            if self.digests is not None:
                self.digests.flush()
        return "sha256:" + h.hexdigest()

    def _entry(self, rel: str, shown: str, st: os.stat_result | None = None) -> bytes:
        host = str(self.host_path(rel))
        return self._entry_host(shown, host, st if st is not None else os.lstat(host))

    def _entry_host(self, shown: str, host: str, st: os.stat_result) -> bytes:
        mode = st.st_mode
        if stat.S_ISREG(mode):
            extra = self._file_digest(host, st)
        elif stat.S_ISLNK(mode):
            extra = os.readlink(host)
        else:
            extra = ""
        return b"%s\0%o\0%o\0%s\n" % (
            shown.encode("utf-8", "surrogateescape"), stat.S_IFMT(mode), stat.S_IMODE(mode),
            extra.encode("utf-8", "surrogateescape"),
        )

    def _file_digest(self, path: str, st: os.stat_result) -> str:
        # Unchanged files are known by their stat data; only changed ones are read.
        row = self._known.get(path)
        if (
            row is not None
            and row[4] == st.st_mtime_ns
            and row[1] == st.st_ino
            and row[2] == st.st_size
            and row[5] == st.st_ctime_ns
            and row[3] == st.st_mode
            and row[0] == st.st_dev
        ):
            return row[6]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()
        # A file modified within the timestamp granularity could change again without
        # its mtime moving: such a digest is used for this build but not remembered.
        if time.time_ns() - st.st_mtime_ns > 2 * 10**9:
            self._known[path] = (
                st.st_dev, st.st_ino, st.st_size, st.st_mode, st.st_mtime_ns, st.st_ctime_ns, digest
            )
            if self.digests is not None:
                self.digests.changed(self.path)
        return digest
