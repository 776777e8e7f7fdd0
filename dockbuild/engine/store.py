"""The cache root: content-addressed blobs, layer directories and the SQLite records.

Layout (DESIGN.md): ``blobs/sha256/<hex>``, ``snapshots/<id>`` (one layer directory in
overlay format each), ``tmp/`` (work in progress, one folder per process), ``locks/``
and ``db.sqlite`` (WAL). Everything reaches its final name by rename, so a reader never
sees half a file and a killed build leaves only ``tmp/`` entries, swept by the next run.
Several processes may share one root: records are written in transactions, and a
per-key lock file makes an identical step run once while the others wait for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY,       -- cache key of a solved op
    layers TEXT NOT NULL,       -- JSON list of layer ids, bottom first
    description TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,        -- directory name under snapshots/
    diff_id TEXT,               -- sha256 of the uncompressed layer tar, once known
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS layer_blobs (
    layer_id TEXT NOT NULL,
    compression TEXT NOT NULL,  -- gzip | zstd | uncompressed
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (layer_id, compression)
);
CREATE TABLE IF NOT EXISTS resolutions (
    ref TEXT NOT NULL,
    platform TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    resolved REAL NOT NULL,
    PRIMARY KEY (ref, platform)
);
"""


def default_root() -> Path:
    env = os.environ.get("DOCKBUILD_ROOT")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "dockbuild"


@dataclass(frozen=True)
class BlobInfo:
    layer_id: str
    compression: str
    digest: str
    size: int


class Store:
    """One cache root, opened by one build (thread-safe within the process)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_root()).absolute()
        for sub in ("blobs/sha256", "snapshots", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._db_lock = threading.Lock()
        self._db = sqlite3.connect(
            self.root / "db.sqlite", timeout=60, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._db_lock:
            self._db.executescript(_SCHEMA)
        self._tmp = self.root / "tmp" / f"{os.getpid()}-{os.urandom(4).hex()}"
        self._tmp.mkdir()
        self._sweep_tmp()

    # -- paths -------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or len(hexpart) != 64:
            raise ValueError(f"unsupported digest {digest!r}")
        return self.root / "blobs" / "sha256" / hexpart

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def layer_path(self, layer_id: str) -> Path:
        return self.root / "snapshots" / layer_id

    def tempdir(self, prefix: str = "w") -> Path:
        """A fresh directory inside this process's temp area (same filesystem as snapshots)."""
        path = self._tmp / f"{prefix}{os.urandom(6).hex()}"
        path.mkdir()
        return path

    # -- blobs -------------------------------------------------------------------

    def put_blob_file(self, src: Path) -> tuple[str, int]:
        """Move a finished file into the blob store under its sha256; return (digest, size)."""
        h = hashlib.sha256()
        with open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = "sha256:" + h.hexdigest()
        size = src.stat().st_size
        dest = self.blob_path(digest)
        if dest.exists():
            src.unlink()
        else:
            os.replace(src, dest)
        return digest, size

    def put_blob_bytes(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        dest = self.blob_path(digest)
        if not dest.exists():
            tmp = self._tmp / f"b{os.urandom(6).hex()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        return digest

    # -- layers ------------------------------------------------------------------

    def has_layer(self, layer_id: str) -> bool:
        return self.layer_path(layer_id).is_dir()

    def commit_layer(self, layer_id: str, src: Path, diff_id: str | None = None) -> None:
        """Rename a finished layer directory into place (first writer wins) and record it."""
        dest = self.layer_path(layer_id)
        try:
            os.rename(src, dest)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            remove_tree(src)  # another process committed the same layer first
        now = time.time()
        with self._db_lock:
            self._db.execute(
                "INSERT INTO layers(id, diff_id, size, created, last_used) VALUES (?,?,?,?,?)"
                " ON CONFLICT(id) DO UPDATE SET last_used=excluded.last_used,"
                " diff_id=COALESCE(layers.diff_id, excluded.diff_id)",
                (layer_id, diff_id, tree_size(dest), now, now),
            )

    def layer_diff_id(self, layer_id: str) -> str | None:
        row = self._query_one("SELECT diff_id FROM layers WHERE id=?", (layer_id,))
        return row[0] if row else None

    def set_layer_diff_id(self, layer_id: str, diff_id: str) -> None:
        with self._db_lock:
            self._db.execute("UPDATE layers SET diff_id=? WHERE id=?", (diff_id, layer_id))

    def layer_blob(self, layer_id: str, compression: str) -> BlobInfo | None:
        row = self._query_one(
            "SELECT digest, size FROM layer_blobs WHERE layer_id=? AND compression=?",
            (layer_id, compression),
        )
        if row is None or not self.has_blob(row[0]):
            return None
        return BlobInfo(layer_id, compression, row[0], row[1])

    def set_layer_blob(self, info: BlobInfo) -> None:
        with self._db_lock:
            self._db.execute(
                "INSERT OR REPLACE INTO layer_blobs(layer_id, compression, digest, size)"
                " VALUES (?,?,?,?)",
                (info.layer_id, info.compression, info.digest, info.size),
            )

    # -- cache records -----------------------------------------------------------

    def get_record(self, key: str) -> list[str] | None:
        """The layer chain solved for ``key``, if every layer of it is still on disk."""
        row = self._query_one("SELECT layers FROM records WHERE key=?", (key,))
        if row is None:
            return None
        layers = json.loads(row[0])
        if not all(self.has_layer(lid) for lid in layers):
            return None
        with self._db_lock:
            self._db.execute("UPDATE records SET last_used=? WHERE key=?", (time.time(), key))
        return layers

    def put_record(self, key: str, layers: list[str], description: str) -> None:
        now = time.time()
        with self._db_lock:
            self._db.execute(
                "INSERT OR REPLACE INTO records(key, layers, description, created, last_used)"
                " VALUES (?,?,?,?,?)",
                (key, json.dumps(layers), description, now, now),
            )

    # -- image tag resolutions -----------------------------------------------------

    def get_resolution(self, ref: str, platform: str) -> str | None:
        row = self._query_one(
            "SELECT manifest_digest FROM resolutions WHERE ref=? AND platform=?", (ref, platform)
        )
        return row[0] if row else None

    def put_resolution(self, ref: str, platform: str, manifest_digest: str) -> None:
        with self._db_lock:
            self._db.execute(
                "INSERT OR REPLACE INTO resolutions(ref, platform, manifest_digest, resolved)"
                " VALUES (?,?,?,?)",
                (ref, platform, manifest_digest, time.time()),
            )

    # -- locking and housekeeping --------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold an exclusive inter-process lock named by ``key`` (blocks until free)."""
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        fd = os.open(self.root / "locks" / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _query_one(self, sql: str, args: tuple) -> tuple | None:
        with self._db_lock:
            return self._db.execute(sql, args).fetchone()

    def _sweep_tmp(self) -> None:
        """Remove temp folders of processes that no longer run (a killed build's leftovers)."""
        for entry in (self.root / "tmp").iterdir():
            pid_text = entry.name.split("-", 1)[0]
            if entry == self._tmp or not pid_text.isdigit() or _alive(int(pid_text)):
                continue
            remove_tree(entry)

    def close(self) -> None:
        remove_tree(self._tmp)
        with self._db_lock:
            self._db.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_tree(path: Path) -> None:
    """Remove a directory tree, including dirs that an overlay left unreadable (mode 000)."""

    def fix_and_retry(func, p, _exc):  # type: ignore[no-untyped-def]
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        with contextlib.suppress(FileNotFoundError):
            func(p)

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=fix_and_retry)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total
