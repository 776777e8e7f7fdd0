"""Local sources: the build context (or a named local context) read in place.

Nothing is copied out of a context until a step needs it: COPY reads the files where
they are, and a cache key covers only the files a step selects (name, type, mode, link
target and content; not mtime or owner, as in BuildKit). ``.dockerignore`` patterns and
COPY globs follow Go's ``filepath.Match``; ignore patterns also know ``**`` and ``!``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import stat
import threading
from collections.abc import Iterator
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


def _ignored(rules: tuple[IgnoreRule, ...], rel: str) -> bool:
    """Last match wins; a pattern that matches a parent directory matches its children."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for rule in rules:
        rx = _compile(rule.pattern, True)
        if any(rx.match(p) for p in prefixes):
            result = not rule.exclusion
    return result


@dataclass
class LocalDir:
    """A directory on this host offered to the build under a name."""

    path: Path
    excludes: tuple[str, ...] = ()
    _rules: tuple[IgnoreRule, ...] = field(init=False, repr=False)
    _digests: dict[tuple[int, int, int, int], str] = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path).absolute()
        self._rules = ignore_rules(self.excludes)
        self._digests = {}
        self._lock = threading.Lock()

    def ignored(self, rel: str) -> bool:
        return bool(self._rules) and _ignored(self._rules, rel)

    def host_path(self, rel: str) -> Path:
        return self.path / rel if rel else self.path

    def walk(self, rel: str = "") -> Iterator[str]:
        """Paths below ``rel`` (not ``rel`` itself), sorted, parents first, ignores applied.

        An ignored directory is still entered when a later ``!`` rule may re-include
        something below it, as moby's patternmatcher does.
        """
        may_reinclude = any(r.exclusion for r in self._rules)
        try:
            names = sorted(os.listdir(self.host_path(rel)))
        except NotADirectoryError:
            return
        for name in names:
            child = f"{rel}/{name}" if rel else name
            ignored = self.ignored(child)
            is_dir = stat.S_ISDIR(os.lstat(self.host_path(child)).st_mode)
            if not ignored:
                yield child
            if is_dir and (not ignored or may_reinclude):
                yield from self.walk(child)

    def glob(self, pattern: str) -> list[str]:
        """Context paths matching a COPY source pattern (component by component)."""
        parts = [p for p in pattern.strip("/").split("/") if p not in ("", ".")]
        found = [""]
        for part in parts:
            nxt = []
            for base in found:
                if has_glob(part):
                    try:
                        names = sorted(os.listdir(self.host_path(base)))
                    except (NotADirectoryError, FileNotFoundError):
                        continue
                    nxt += [f"{base}/{n}" if base else n for n in names if match(part, n)]
                else:
                    cand = f"{base}/{part}" if base else part
                    if os.path.lexists(self.host_path(cand)):
                        nxt.append(cand)
            found = nxt
        return [f for f in found if not self.ignored(f)]

    def checksum(self, rels: list[str]) -> str:
        """A digest of what a step would read: each path and, for dirs, all below it."""
        h = hashlib.sha256()
        for rel in rels:
            h.update(self._entry(rel, rel))
            if stat.S_ISDIR(os.lstat(self.host_path(rel)).st_mode):
                for child in self.walk(rel):
                    h.update(self._entry(child, child[len(rel) + 1 :] if rel else child))
        return "sha256:" + h.hexdigest()

    def _entry(self, rel: str, shown: str) -> bytes:
        p = self.host_path(rel)
        st = os.lstat(p)
        kind = stat.S_IFMT(st.st_mode)
        extra = ""
        if stat.S_ISLNK(st.st_mode):
            extra = os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            extra = self._file_digest(p, st)
        return f"{shown}\0{kind:o}\0{stat.S_IMODE(st.st_mode):o}\0{extra}\n".encode()

    def _file_digest(self, p: Path, st: os.stat_result) -> str:
        # Unchanged files are known by their stat data; only changed ones are read.
        sig = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            cached = self._digests.get(sig)
        if cached is not None:
            return cached
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self._digests[sig] = digest
        return digest
