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
import marshal
import os
import re
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

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


class IgnoreRule(NamedTuple):
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
    """What an earlier build learned about a context, kept in the cache db.

    Two tables, both in the store's ``db.sqlite`` (WAL), one row per context directory
    (one read and one write per build, not one per file), so several dockbuild processes
    share them; the last writer wins, and any row is correct for the stat data it records:

    - ``context_digests``: the content digest of each file, keyed by its path, device,
      inode, size, mode, mtime and ctime. A file whose stat data is unchanged is not read
      again.
    - ``context_trees``: for each directory of the context (under one set of ignore
      rules), a digest of the stat data of its entries and the tree hash that data gave.
      A directory whose entries all stat the same reuses its hash: an unchanged context
      costs one ``lstat`` per entry and no hashing. The file table is then not even loaded.
    - ``context_copies``: the files the last ``COPY`` from the context wrote into layers,
      keyed by their device, inode and ctime, with the digest of their content. A later
      copy of an unchanged file hardlinks that layer file instead of copying it again.
    """

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS context_digests (
        root TEXT PRIMARY KEY,  -- absolute host path of a context directory
        data BLOB NOT NULL,     -- marshal: {host path: (dev, ino, size, mode, mtime_ns, ctime_ns, sha256 hex)}
        updated REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS context_trees (
        root TEXT NOT NULL,     -- absolute host path of a context directory
        rules TEXT NOT NULL,    -- digest of the ignore rules the hashes were made under
        data BLOB NOT NULL,     -- marshal: {relative dir: (stat signature, tree hash hex)}
        updated REAL NOT NULL,
        PRIMARY KEY (root, rules)
    );
    CREATE TABLE IF NOT EXISTS context_copies (
        root TEXT PRIMARY KEY,  -- absolute host path of a context directory
        data BLOB NOT NULL,     -- marshal: {(dev, ino, ctime_ns) of a layer file: sha256 hex}
        updated REAL NOT NULL
    );
    """

    def __init__(self, db_path: Path) -> None:
        import sqlite3

        self.path = db_path
        self._conn = sqlite3.connect(
            db_path, timeout=60, check_same_thread=False, isolation_level=None
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(self._SCHEMA)
        self._lock = threading.Lock()
        self._maps: dict[tuple[str, str], dict[Any, Any]] = {}  # (table, row key) -> its map
        self._dirty: set[tuple[str, str]] = set()

    def load(self, root: Path) -> dict[str, tuple[Any, ...]]:
        """The file map of ``root`` (read once per process)."""
        return self._load("context_digests", "root=?", (str(root),))

    def trees(self, root: Path, rules: str) -> dict[str, tuple[bytes, str]]:
        """The directory map of ``root`` under the ignore rules ``rules``."""
        return self._load("context_trees", "root=? AND rules=?", (str(root), rules))

    def copies(self, root: Path) -> dict[tuple[int, int, int], str]:
        """The layer files the last copy from ``root`` wrote (read once per process)."""
        return self._load("context_copies", "root=?", (str(root),))

    def copied(self, root: Path, written: dict[tuple[int, int, int], str]) -> None:
        """Replace what :meth:`copies` recorded for ``root`` by ``written`` at the next
        flush (only the newest copies: the table does not grow build after build)."""
        with self._lock:
            self._maps[("context_copies", str(root))] = written
            self._dirty.add(("context_copies", str(root)))

    def _load(self, table: str, where: str, args: tuple[str, ...]) -> dict[Any, Any]:
        key = (table, "\0".join(args))
        with self._lock:
            found = self._maps.get(key)
            if found is not None:
                return found
            data: dict[Any, Any] = {}
            with contextlib.suppress(Exception):  # a busy or damaged table: start afresh
                row = self._conn.execute(f"SELECT data FROM {table} WHERE {where}", args).fetchone()
                if row is not None:
                    loaded = marshal.loads(row[0])
                    if isinstance(loaded, dict):
                        data = loaded
            self._maps[key] = data
            return data

    def forget(self, root: Path) -> None:
        """Drop what was loaded for ``root`` (another process has written it since)."""
        with self._lock:
            for key in [k for k in self._maps if k[1].split("\0")[0] == str(root)]:
                if key not in self._dirty:
                    del self._maps[key]

    def changed(self, root: Path, rules: str | None = None) -> None:
        """Mark the file map (``rules`` None) or a directory map of ``root`` for writing."""
        with self._lock:
            if rules is None:
                self._dirty.add(("context_digests", str(root)))
            else:
                self._dirty.add(("context_trees", f"{root}\0{rules}"))

    def flush(self) -> None:
        import sqlite3

        with self._lock:
            # a copy first: another thread may be adding digests while we write
            todo = [(key, marshal.dumps(dict(self._maps[key]))) for key in self._dirty]
            self._dirty.clear()
            if not todo:
                return
            now = time.time()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                for (table, row), blob in todo:
                    if table in ("context_digests", "context_copies"):
                        self._conn.execute(
                            f"INSERT OR REPLACE INTO {table}(root, data, updated) VALUES (?,?,?)",
                            (row, blob, now),
                        )
                    else:
                        root, rules = row.split("\0")
                        self._conn.execute(
                            "INSERT OR REPLACE INTO context_trees(root, rules, data, updated) VALUES (?,?,?,?)",
                            (root, rules, blob, now),
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


_EMPTY_TREE = hashlib.sha256().hexdigest()
# A file modified within the timestamp granularity could change again without its stat
# data moving: what was learned from it is used for this build but not remembered.
_RACY_NS = 2 * 10**9
# A prefetch is shared by two children only when the directories above their shares hold
# at most this many entries (LocalDir._shares).
_SHARED_ABOVE = 256


class LocalDir:
    """A directory on this host offered to the build under a name.

    Its cache keys hash a tree: each directory's hash covers its entries' names, types,
    modes and, per entry, the file's content digest, the link's target or the
    subdirectory's hash, so a directory's hash can be reused as long as every entry below
    it stats the same. Within a process a context is assumed not to change.

    A plain class, not a dataclass: a no-op rebuild makes one per local context, and
    the dataclasses module is a large part of its start-up.
    """

    __slots__ = (
        "path", "excludes", "digests", "_rules", "_rules_key", "_known", "_trees", "_hashed",
        "_copies", "_written", "_may_reinclude", "_lock", "_prefetch",
    )  # fmt: skip

    def __init__(self, path: Path, excludes: tuple[str, ...] = (), digests: FileDigests | None = None) -> None:
        self.path = Path(path).absolute()
        self.excludes = excludes
        self.digests = digests  # the persistent tables, when there is a cache
        self._rules = ignore_rules(self.excludes)
        self._may_reinclude = any(r.exclusion for r in self._rules)
        self._rules_key = hashlib.sha256(
            repr([(r.pattern, r.exclusion) for r in self._rules]).encode()
        ).hexdigest()[:32]
        self._known: dict[str, tuple[Any, ...]] | None = None if digests is not None else {}  # loaded when first needed
        self._trees: dict[str, tuple[bytes, str]] = digests.trees(self.path, self._rules_key) if digests is not None else {}
        self._hashed: dict[str, str] = {}  # relative dir -> its tree hash, this process
        self._copies: dict[tuple[int, int, int], str] | None = None  # layer files earlier copies wrote, loaded when first needed
        self._written: dict[tuple[int, int, int], str] = {}  # the layer files copies of this process wrote or reused
        self._lock = threading.RLock()
        self._prefetch: list[tuple[int, int]] | None = None  # (pid, pipe) of each child

    def __repr__(self) -> str:
        return f"LocalDir(path={self.path!r}, excludes={self.excludes!r}, digests={self.digests!r})"

    def ignored(self, rel: str) -> bool:
        return bool(self._rules) and is_ignored(self._rules, rel)

    def host_path(self, rel: str) -> Path:
        return self.path / rel if rel else self.path

    def reincludes(self, rel: str) -> bool:
        """Whether ``rel``, an ignored directory, holds something a later ``!`` rule
        takes back (``docs`` then ``!docs/keep.md``): it then exists, with only that."""
        if not self._may_reinclude:
            return False
        if not stat.S_ISDIR(os.lstat(self.host_path(rel)).st_mode):
            return False
        return next(self.walk(rel), None) is not None

    def walk(self, rel: str = "") -> Iterator[str]:
        """Paths below ``rel`` (not ``rel`` itself), sorted, parents first, ignores applied.

        An ignored directory is still entered when a later ``!`` rule may re-include
        something below it, as moby's patternmatcher does.
        """
        rules = self._rules
        host = os.path.join(self.path, rel) if rel else str(self.path)
        try:
            with os.scandir(host) as it:
                entries = sorted(it, key=lambda e: e.name)
        except NotADirectoryError:
            return
        prefix = rel + "/" if rel else ""
        for entry in entries:
            child = prefix + entry.name
            ignored = bool(rules) and is_ignored(rules, child)
            if not ignored:
                yield child
            if entry.is_dir(follow_symlinks=False) and (not ignored or self._may_reinclude):
                yield from self.walk(child)

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

    # -- cache keys -------------------------------------------------------------------

    def checksum(self, rels: list[str]) -> str:
        """A digest of what a step would read: each path and, for dirs, all below it."""
        h = hashlib.sha256()
        try:
            with self._lock:
                if self._prefetch is not None:
                    self._collect_prefetch()
                for rel in rels:
                    h.update(self._entry(rel, rel, below=True))
        finally:
            if self.digests is not None:
                self.digests.flush()
        return "sha256:" + h.hexdigest()

    def prefetch(self) -> None:
        """Start hashing the whole directory in child processes, for a step that will
        read it (``COPY . /app``), while this process loads the rest of dockbuild and
        converts the Dockerfile. Processes, not threads: the walk is a system call per
        entry plus Python around each, and a thread would wait for the GIL after every
        one of them. Two children share the subdirectories of the first directory that
        branches (an unchanged 20,000-file context is then walked in about half the time
        on two cores); this process hashes what is above them once they are done. Call
        it while this process has no other threads (the fork copies only the caller).
        Each child records what it learns in the cache db and sends its directory
        hashes back; the first checksum waits for them.
        """
        if self.digests is None or self._prefetch is not None:
            return
        self._prefetch = []
        for share in self._shares():
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
            if pid == 0:  # pragma: no cover (the child; its result is what tests check)
                code = 1
                try:
                    os.close(read_end)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    # The parent's sqlite connection must not be used across a fork.
                    self.digests = FileDigests(self.digests.path)
                    self._trees = self.digests.trees(self.path, self._rules_key)
                    self._known = None
                    for rel in share:
                        self._tree(rel, os.path.join(self.path, rel) if rel else str(self.path))
                    self.digests.flush()
                    data = marshal.dumps(self._hashed)
                    with os.fdopen(write_end, "wb") as out:
                        out.write(data)
                    code = 0
                finally:
                    os._exit(code)
            os.close(write_end)
            self._prefetch.append((pid, read_end))

    def _shares(self) -> list[list[str]]:
        """The directories each prefetching child hashes: the subdirectories of the first
        directory with more than one, split in two (interleaved by name, so that both
        halves get alike parts); the whole directory for one child when it has no such
        branch, or when the directories above the children's shares hold more than a
        few entries (this process would stat those after the children are done, while
        one child walks them during start-up). Ignore rules do not matter here: a
        directory's hash is the same whoever makes it, and one not needed is not used."""
        rel = ""
        above = 0  # the entries this process would stat itself
        for _depth in range(8):
            host = os.path.join(self.path, rel) if rel else str(self.path)
            try:
                with os.scandir(host) as it:
                    entries = list(it)
            except OSError:
                return [[""]]
            above += len(entries)
            subs = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
            if len(subs) != 1:
                break
            rel = f"{rel}/{subs[0]}" if rel else subs[0]
        if len(subs) < 2 or above > _SHARED_ABOVE:
            return [[""]]
        dirs = [f"{rel}/{name}" if rel else name for name in subs]
        return [dirs[0::2], dirs[1::2]]

    def _collect_prefetch(self) -> None:
        """Take the directory hashes of a prefetch (whatever went wrong in a child, the
        walk done here meets the same problem again and reports it)."""
        assert self._prefetch is not None
        children, self._prefetch = self._prefetch, None
        for pid, read_end in children:
            with os.fdopen(read_end, "rb") as pipe:
                data = pipe.read()
            _, status = os.waitpid(pid, 0)
            hashed = None
            if status == 0:
                with contextlib.suppress(ValueError, EOFError, TypeError):
                    hashed = marshal.loads(data)
            if isinstance(hashed, dict):
                self._hashed.update(hashed)
        if self.digests is None:
            return
        # The children wrote the tables: read them again rather than write back older maps.
        self.digests.forget(self.path)
        self._trees = self.digests.trees(self.path, self._rules_key)
        self._known = None

    def stop(self) -> None:
        """End a prefetch no step waited for, and save what was learned."""
        if self._prefetch is not None:
            children, self._prefetch = self._prefetch, None
            for pid, read_end in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(read_end)
        if self.digests is not None:
            self.digests.flush()

    def _entry(self, rel: str, shown: str, below: bool = False) -> bytes:
        """The line a cache key hashes for the path ``rel``, named ``shown``: its type,
        mode and content (a file's digest, a link's target) and, with ``below``, for a
        directory the hash of everything in it (explain.py compares lines without)."""
        host = os.path.join(self.path, rel) if rel else str(self.path)
        st = os.lstat(host)
        if not (below and stat.S_ISDIR(st.st_mode)):
            return self._line(shown, host, st, None)
        with self._lock:
            tree = self._hashed.get(rel)
            if tree is None:
                tree = self._tree(rel, host)
            return self._line(shown, host, st, tree)

    def _tree(self, rel: str, host: str, parent_fd: int | None = None) -> str:
        """The tree hash of the directory ``rel``: its entries' stat data first, and only
        when that differs from what the last build recorded, its entries' lines."""
        rules = self._rules
        prefix = rel + "/" if rel else ""
        sig: list[tuple[Any, ...]] = []
        append = sig.append
        stats: list[os.stat_result] = []  # beside sig, in the same order
        keep = stats.append
        isdir = stat.S_ISDIR
        racy = time.time_ns() - _RACY_NS
        fresh = False
        # Entries are stat'ed relative to their directory's fd (fstatat): a shorter path
        # lookup per entry than an lstat of the full path.
        fd = os.open(
            os.path.basename(host) if parent_fd is not None else host,
            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=parent_fd,
        )
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    name = entry.name
                    ignored = bool(rules) and is_ignored(rules, prefix + name)
                    sub = None
                    if isdir(st.st_mode):
                        if not ignored or self._may_reinclude:
                            # A prefetching child may have hashed it already (this process
                            # assumes the context does not change while it runs).
                            sub = self._hashed.get(prefix + name) or self._tree(
                                prefix + name, os.path.join(host, name), fd
                            )
                    elif st.st_mtime_ns > racy:
                        fresh = True
                    keep(st)
                    append((name, st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev, ignored, sub))
        finally:
            os.close(fd)
        # Version 2 of marshal writes no back-references: equal lists give equal bytes
        # (or, rarely, different ones: the directory is then hashed again).
        signature = hashlib.sha256(marshal.dumps(sig, 2)).digest()
        known = self._trees.get(rel)
        if known is not None and known[0] == signature:
            self._hashed[rel] = known[1]
            return known[1]
        h = hashlib.sha256()
        for i in sorted(range(len(sig)), key=lambda i: sig[i][0]):
            name, *_, ignored, sub = sig[i]
            if not ignored:
                h.update(self._line(name, os.path.join(host, name), stats[i], sub))
            elif sub is not None and sub != _EMPTY_TREE:  # an ignored dir with re-included paths
                h.update(b"%s\0ignored\0%s\n" % (_bytes(name), sub.encode()))
        tree = h.hexdigest()
        self._hashed[rel] = tree
        if not fresh and self.digests is not None:
            self._trees[rel] = (signature, tree)
            self.digests.changed(self.path, self._rules_key)
        return tree

    def _line(self, shown: str, host: str, st: os.stat_result, tree: str | None) -> bytes:
        mode = st.st_mode
        if stat.S_ISREG(mode):
            extra = self._file_digest(host, st)
        elif stat.S_ISLNK(mode):
            extra = os.readlink(host)
        else:
            extra = tree or ""
        return b"%s\0%o\0%o\0%s\n" % (_bytes(shown), stat.S_IFMT(mode), stat.S_IMODE(mode), _bytes(extra))

    # -- layer files copied from this context -------------------------------------------

    def known_digest(self, host: str, st: os.stat_result) -> str | None:
        """The content digest of the context file at ``host`` if its stat data ``st`` is
        the one it was last read with; None rather than reading it."""
        with self._lock:
            known = self._known
            if known is None:
                known = self._known = self.digests.load(self.path) if self.digests is not None else {}
        row = known.get(host)
        if row is not None and row[1:6] == (st.st_ino, st.st_size, st.st_mode, st.st_mtime_ns, st.st_ctime_ns):
            return row[6] if row[0] == st.st_dev else None
        return None

    def copied_digest(self, st: os.stat_result) -> str | None:
        """The content digest a copy recorded for the layer file with stat data ``st``."""
        key = (st.st_dev, st.st_ino, st.st_ctime_ns)
        return self._written.get(key) or self._earlier_copies().get(key)

    def remember_copy(self, st: os.stat_result, digest: str) -> None:
        """Record that the layer file with stat data ``st`` holds content ``digest``."""
        if self.digests is None:
            return
        self._earlier_copies()  # read before this process's records replace them
        with self._lock:
            first = not self._written
            self._written[(st.st_dev, st.st_ino, st.st_ctime_ns)] = digest
            if first:
                self.digests.copied(self.path, self._written)  # the same dict: later records follow

    def _earlier_copies(self) -> dict[tuple[int, int, int], str]:
        with self._lock:
            if self._copies is None:
                self._copies = self.digests.copies(self.path) if self.digests is not None else {}
            return self._copies

    def _file_digest(self, path: str, st: os.stat_result) -> str:
        # Unchanged files are known by their stat data; only changed ones are read.
        found = self.known_digest(path, st)
        if found is not None:
            return found
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()
        if time.time_ns() - st.st_mtime_ns > _RACY_NS:
            self._known[path] = (  # type: ignore[index]  # loaded by known_digest
                st.st_dev, st.st_ino, st.st_size, st.st_mode, st.st_mtime_ns, st.st_ctime_ns, digest
            )
            if self.digests is not None:
                self.digests.changed(self.path)
        return digest


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")
