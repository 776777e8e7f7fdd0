"""The cache root: content-addressed blobs, layer directories and the SQLite records.

Layout (docs/how-it-works.md, "The cache root"): ``blobs/sha256/<hex>``, ``snapshots/<id>`` (one layer directory in
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
import re
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, cast

from dockbuild.engine import archive
from dockbuild.engine.cacheroot import default_root
from dockbuild.engine.cacheroot import prepare as prepare_root
from dockbuild.errors import DigestMismatchError, DockbuildError

# The database's shape, in PRAGMA user_version; docs/cache.md says what each one added.
# Older versions are migrated when a cache root is opened; a newer one is refused.
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY,       -- cache key of a solved op
    layers TEXT NOT NULL,       -- JSON list of layer ids, bottom first
    description TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    type TEXT NOT NULL DEFAULT 'regular',  -- BuildKit's record types (du/prune filters)
    owns TEXT NOT NULL DEFAULT '[]',        -- JSON: the layers this record created
    refs TEXT NOT NULL DEFAULT '[]',        -- JSON: blobs it pins (image manifest, config)
    inputs TEXT                             -- JSON: what the key was made of (explain)
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


_HEX64 = re.compile(r"[0-9a-f]{64}")


class BlobInfo(NamedTuple):
    layer_id: str
    compression: str
    digest: str
    size: int


class Store:
    """One cache root, opened by one build (thread-safe within the process)."""

    def __init__(self, root: Path | None = None, *, shared: bool = True) -> None:
        self.root = (root or default_root()).absolute()
        prepare_root(self.root, ("blobs/sha256", "snapshots", "tmp", "locks"))
        archive.use_whiteout_marker(self.root)
        self._db_lock = threading.Lock()
        self._db = sqlite3.connect(
            self.root / "db.sqlite", timeout=60, check_same_thread=False, isolation_level=None
        )
        # SQLite answers a second process switching a new database to WAL with "database
        # is locked" at once (no busy wait): processes that open a fresh root together
        # take turns here.
        init_fd = os.open(self.root / "locks" / "db-init", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(init_fd, fcntl.LOCK_EX)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            _open_schema(self._db, self.root)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise DockbuildError(
                f"cache database {self.root / 'db.sqlite'} cannot be read: {e}",
                hint=f"move {self.root} aside (or set DOCKBUILD_ROOT to another directory) and build again",
            ) from e
        finally:
            os.close(init_fd)  # and with it the lock
        # Every process holds the GC lock shared while it uses the cache; prune and GC
        # take it exclusively, so they never delete what a running build reads.
        self._gc_fd = os.open(self.root / "locks" / "gc", os.O_RDWR | os.O_CREAT, 0o600)
        if shared:
            fcntl.flock(self._gc_fd, fcntl.LOCK_SH)
        # This process's temp area, made on first use: a cached build needs none (and on
        # a file system without a journal, every directory made and removed slows the
        # next minute of file creation, see docs/run.md).
        self._tmp = self.root / "tmp" / f"{os.getpid()}-{os.urandom(4).hex()}"
        self._tmp_made = False
        self.grew = False  # whether this process added a blob, layer or record
        self._sweep_tmp()

    # -- paths -------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or not _HEX64.fullmatch(hexpart):
            raise ValueError(f"unsupported digest {digest!r}")
        return self.root / "blobs" / "sha256" / hexpart

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def layer_path(self, layer_id: str) -> Path:
        return self.root / "snapshots" / layer_id

    def tempdir(self, prefix: str = "w") -> Path:
        """A fresh directory inside this process's temp area (same filesystem as snapshots)."""
        path = self._tmpdir() / f"{prefix}{os.urandom(6).hex()}"
        path.mkdir()
        return path

    # -- blobs -------------------------------------------------------------------

    def put_blob_file(self, src: Path, digest: str | None = None) -> tuple[str, int]:
        """Move a finished file into the blob store under its sha256; return (digest, size).

        ``digest``: the caller has verified the content has this digest (a download
        hashed on the way in), so it is not read again.
        """
        if digest is None:
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
            self.grew = True
        return digest, size

    def put_blob_bytes(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        dest = self.blob_path(digest)
        if not dest.exists():
            tmp = self._tmpdir() / f"b{os.urandom(6).hex()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            self.grew = True
        return digest

    # -- layers ------------------------------------------------------------------

    def has_layer(self, layer_id: str) -> bool:
        """Whether the layer is here: unpacked, or packed (its verified blob only)."""
        return self.layer_path(layer_id).is_dir() or self.packed_blob(layer_id) is not None

    def packed_blob(self, layer_id: str) -> BlobInfo | None:
        """The stored blob a layer can be unpacked from (its diff_id known), if any."""
        with self._db_lock:
            rows = self._db.execute(
                "SELECT b.compression, b.digest, b.size FROM layer_blobs b"
                " JOIN layers l ON l.id = b.layer_id WHERE b.layer_id=? AND l.diff_id IS NOT NULL"
                " AND b.compression IN ('gzip', 'zstd', 'uncompressed')",
                (layer_id,),
            ).fetchall()
        for compression, digest, size in rows:
            if self.has_blob(digest):
                return BlobInfo(layer_id, compression, digest, size)
        return None

    def add_packed_layer(self, blob: BlobInfo, diff_id: str, created: float | None = None) -> None:
        """Record a layer by its blob, already verified against its digest, without
        unpacking it: a build whose steps are all cached, exported as an image, never
        needs its files. :meth:`unpacked_paths` unpacks it (checking ``diff_id``) once
        a step or an export reads them. ``created`` is when the layer was first made (an
        imported cache's time, so history times match the exporter's); default now."""
        self.grew = True
        now = time.time()
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO layers(id, diff_id, size, created, last_used) VALUES (?,?,0,?,?)"
                    " ON CONFLICT(id) DO UPDATE SET last_used=excluded.last_used,"
                    " diff_id=COALESCE(layers.diff_id, excluded.diff_id)",
                    (blob.layer_id, diff_id, now if created is None else created, now),
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO layer_blobs(layer_id, compression, digest, size)"
                    " VALUES (?,?,?,?)",
                    (blob.layer_id, blob.compression, blob.digest, blob.size),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def unpacked_paths(self, layer_ids: Sequence[str]) -> tuple[Path, ...]:
        """The directories of ``layer_ids``; packed layers are unpacked first (in parallel)."""
        missing = [lid for lid in dict.fromkeys(layer_ids) if not self.layer_path(lid).is_dir()]
        if len(missing) == 1:
            self._unpack(missing[0])
        elif missing:
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, len(missing))) as pool:
                for job in [pool.submit(self._unpack, lid) for lid in missing]:
                    job.result()
        return tuple(self.layer_path(lid) for lid in layer_ids)

    def _unpack(self, layer_id: str) -> None:
        with self.lock("layer:" + layer_id):
            if self.layer_path(layer_id).is_dir():
                return  # another thread or process unpacked it meanwhile
            blob = self.packed_blob(layer_id)
            diff_id = self.layer_diff_id(layer_id)
            if blob is None or diff_id is None:
                raise DockbuildError(
                    f"layer {layer_id} is missing from the cache",
                    hint="run `dockbuild debug check-cache --repair`, then build again",
                )
            work = self.tempdir("u")
            try:
                got = unpack_verified(self.blob_path(blob.digest), work / "diff")
                if got != diff_id:
                    raise DigestMismatchError(
                        f"layer {blob.digest}: uncompressed content is {got}, expected {diff_id}"
                    )
                self.commit_layer(layer_id, work / "diff", diff_id)
            finally:
                remove_tree(work)

    def commit_layer(self, layer_id: str, src: Path, diff_id: str | None = None) -> None:
        """Rename a finished layer directory into place (first writer wins) and record it."""
        self.grew = True
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
                " ON CONFLICT(id) DO UPDATE SET last_used=excluded.last_used, size=excluded.size,"
                " diff_id=COALESCE(layers.diff_id, excluded.diff_id)",
                (layer_id, diff_id, tree_size(dest), now, now),
            )

    def layer_diff_id(self, layer_id: str) -> str | None:
        row = self._query_one("SELECT diff_id FROM layers WHERE id=?", (layer_id,))
        return row[0] if row else None

    def layer_created(self, layer_id: str) -> float | None:
        """When the layer was first recorded (a later commit of the same id keeps it)."""
        row = self._query_one("SELECT created FROM layers WHERE id=?", (layer_id,))
        return float(row[0]) if row else None

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
        layers: list[str] = json.loads(row[0])
        if not all(self.has_layer(lid) for lid in layers):
            return None
        self.touch_record(key)
        return layers

    def touch_record(self, key: str) -> None:
        with self._db_lock:
            self._db.execute("UPDATE records SET last_used=? WHERE key=?", (time.time(), key))

    def touch_records(self, keys: Sequence[str]) -> None:
        """Mark records used now (one statement): a build served by its result record
        (dockbuild/resultcache.py) uses its steps' records without looking them up."""
        if not keys:
            return
        marks = ",".join("?" * len(keys))
        with self._db_lock:
            self._db.execute(f"UPDATE records SET last_used=? WHERE key IN ({marks})", (time.time(), *keys))

    def put_record(
        self,
        key: str,
        layers: list[str],
        description: str,
        *,
        type: str = "regular",  # noqa: A002 - BuildKit's name for it
        owns: list[str] | None = None,
        refs: list[str] | None = None,
        inputs: dict[str, Any] | None = None,
        created: float | None = None,
    ) -> None:
        """Record (or replace) what ``key`` solved to; one transaction, so a killed
        process leaves either the old record or the new one. ``created`` is when the
        record was first made (an imported cache's time); default now."""
        self.grew = True
        now = time.time()
        with self._db_lock:
            self._db.execute(
                "INSERT OR REPLACE INTO records(key, layers, description, created, last_used,"
                " type, owns, refs, inputs) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    key,
                    json.dumps(layers),
                    description,
                    now if created is None else created,
                    now,
                    type,
                    json.dumps(owns or []),
                    json.dumps(refs or []),
                    json.dumps(inputs, sort_keys=True) if inputs is not None else None,
                ),
            )

    def record(self, key: str) -> Record | None:
        row = self._query_one(f"SELECT {_RECORD_COLUMNS} FROM records WHERE key=?", (key,))
        return _record(row) if row else None

    def records(self) -> list[Record]:
        """Every record, least recently used first."""
        with self._db_lock:
            rows = self._db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM records ORDER BY last_used, key"
            ).fetchall()
        return [_record(r) for r in rows]

    def records_described(self, description: str) -> list[Record]:
        """Records of steps with this description, most recently used first."""
        with self._db_lock:
            rows = self._db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM records WHERE description=?"
                " ORDER BY last_used DESC LIMIT 20",
                (description,),
            ).fetchall()
        return [_record(r) for r in rows]

    def delete_records(self, keys: list[str]) -> None:
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM records WHERE key=?", [(k,) for k in keys])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- what is on disk (du, prune, check-cache) ------------------------------------

    def layer_rows(self) -> dict[str, tuple[int, float]]:
        """layer id -> (size in bytes on disk, last used)."""
        with self._db_lock:
            rows = self._db.execute("SELECT id, size, last_used FROM layers").fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def layer_blob_rows(self) -> list[BlobInfo]:
        with self._db_lock:
            rows = self._db.execute(
                "SELECT layer_id, compression, digest, size FROM layer_blobs"
            ).fetchall()
        return [BlobInfo(*r) for r in rows]

    def delete_layer(self, layer_id: str) -> None:
        """Forget a layer and remove its directory. The directory first moves into this
        process's temp area, so snapshots/ never holds half a layer."""
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM layers WHERE id=?", (layer_id,))
                self._db.execute("DELETE FROM layer_blobs WHERE layer_id=?", (layer_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self.remove_snapshot_dir(layer_id)

    def remove_snapshot_dir(self, layer_id: str) -> None:
        path = self.layer_path(layer_id)
        trash = self._tmpdir() / f"d{os.urandom(6).hex()}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        remove_tree(trash)

    def delete_blob(self, digest: str) -> None:
        with self._db_lock:
            self._db.execute("DELETE FROM layer_blobs WHERE digest=?", (digest,))
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(digest).unlink()

    def other_blob_refs(self) -> set[str]:
        """Blobs other tables pin: downloads of ``ADD URL`` (sources/http.py)."""
        with self._db_lock, contextlib.suppress(sqlite3.OperationalError):
            return {r[0] for r in self._db.execute("SELECT digest FROM http_sources")}
        return set()

    def forget_downloads(self) -> None:
        with self._db_lock, contextlib.suppress(sqlite3.OperationalError):
            self._db.execute("DELETE FROM http_sources")

    def delete_resolutions(self) -> None:
        with self._db_lock:
            self._db.execute("DELETE FROM resolutions")

    def blob_digests(self) -> list[str]:
        """Digests of the finished blobs (not a download still in progress)."""
        out = []
        for entry in os.scandir(self.root / "blobs" / "sha256"):
            if len(entry.name) == 64 and not entry.name.startswith("."):
                out.append("sha256:" + entry.name)
        return out

    def partial_downloads(self) -> list[Path]:
        return [
            Path(e.path)
            for e in os.scandir(self.root / "blobs" / "sha256")
            if e.name.startswith(".")
        ]

    def snapshot_ids(self) -> list[str]:
        return [e.name for e in os.scandir(self.root / "snapshots")]

    def db_paths(self) -> list[Path]:
        return [self.root / n for n in ("db.sqlite", "db.sqlite-wal", "db.sqlite-shm")]

    def integrity_errors(self) -> list[str]:
        with self._db_lock:
            rows = self._db.execute("PRAGMA integrity_check").fetchall()
        return [r[0] for r in rows if r[0] != "ok"]

    def checkpoint(self) -> None:
        """Fold the WAL into the database file (after a prune, so du shows the gain)."""
        with self._db_lock, contextlib.suppress(sqlite3.OperationalError):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

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
        """Hold an exclusive inter-process lock named by ``key`` (blocks until free).

        One byte of the file ``locks/steps`` per key, locked with an open file
        description lock (``F_OFD_SETLKW``: held per open, so threads of one process
        exclude each other as processes do, and released when the descriptor closes):
        no file is made per key, so a step that misses the cache creates no inode for
        its lock, and no lock files pile up.
        """
        offset = int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "big")
        fd = os.open(self.root / "locks" / "steps", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _flock(fcntl.F_WRLCK, offset))
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def exclusive(self, wait: bool = True) -> Iterator[bool]:
        """Hold the GC lock exclusively: no other process uses the cache meanwhile.

        Yields False (and holds nothing) when ``wait`` is False and a build is running.
        The shared hold of this process, if any, is given up first and taken back after.
        """
        fcntl.flock(self._gc_fd, fcntl.LOCK_UN)
        try:
            try:
                fcntl.flock(self._gc_fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            fcntl.flock(self._gc_fd, fcntl.LOCK_UN)

    def _query_one(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        with self._db_lock:
            row: tuple[Any, ...] | None = self._db.execute(sql, args).fetchone()
            return row

    def _tmpdir(self) -> Path:
        if not self._tmp_made:  # any thread may be first; mkdir twice is harmless
            _spread_subdirectories(self._tmp.parent)
            self._tmp.mkdir(exist_ok=True)
            self._tmp_made = True
        return self._tmp

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
        os.close(self._gc_fd)


_RECORD_COLUMNS = "key, layers, description, created, last_used, type, owns, refs, inputs"


class Record(NamedTuple):
    """One cache record: a step's key and the layer chain it solved to."""

    key: str
    layers: list[str]
    description: str
    created: float
    last_used: float
    type: str
    owns: list[str]
    refs: list[str]
    inputs: dict[str, Any] | None


def _record(row: tuple[Any, ...]) -> Record:
    key, layers, description, created, last_used, type_, owns, refs, inputs = row
    return Record(
        key,
        json.loads(layers),
        description,
        created,
        last_used,
        type_,
        json.loads(owns or "[]"),
        json.loads(refs or "[]"),
        json.loads(inputs) if inputs else None,
    )


def _open_schema(db: sqlite3.Connection, root: Path) -> None:
    """Check the database's schema version (``PRAGMA user_version``); bring an older
    one up to date in one transaction; refuse one made by a newer dockbuild."""
    if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it done
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise DockbuildError(
                f"the cache at {root} was made by a newer dockbuild (database schema "
                f"{version}; this dockbuild knows schema {SCHEMA_VERSION} and older)",
                hint="use the newer dockbuild, or another cache root (DOCKBUILD_ROOT); "
                f"to start this one afresh, remove {root}",
            )
        if version < SCHEMA_VERSION:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            _migrate(db)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _migrate(db: sqlite3.Connection) -> None:
    """Schema 0 (before versions) -> 1: add the columns an older records table lacks."""
    have = {row[1] for row in db.execute("PRAGMA table_info(records)")}
    wanted = {
        "type": "TEXT NOT NULL DEFAULT 'regular'",
        "owns": "TEXT NOT NULL DEFAULT '[]'",
        "refs": "TEXT NOT NULL DEFAULT '[]'",
        "inputs": "TEXT",
    }
    for name, decl in wanted.items():
        if name not in have:
            db.execute(f"ALTER TABLE records ADD COLUMN {name} {decl}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _HashingReader:
    """Wraps a stream and hashes what passes through (the layer's diff_id)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.raw.read(n)
        self.sha.update(data)
        return data


def unpack_verified(blob: Path, dest: Path) -> str:
    """Unpack a layer blob into the new directory ``dest``; return its diff_id."""
    from dockbuild.engine import archive
    from dockbuild.userns import in_user_namespace

    dest.mkdir()
    with archive.open_blob(blob) as stream:
        reader = _HashingReader(stream)
        # In a user namespace (rootless), ownership and opaque dirs take the rootless path.
        # A reader that only reads is all unpack_layer uses of a BinaryIO.
        archive.unpack_layer(cast(BinaryIO, reader), dest, rootless=in_user_namespace())
        while reader.read(1 << 20):  # tar padding after the end-of-archive marker
            pass
    return "sha256:" + reader.sha.hexdigest()


def _spread_subdirectories(path: Path) -> None:
    """Have ext4 place each new directory in ``path`` in a block group of its own choosing,
    as it does for top-level directories (``chattr +T``), rather than beside ``path``.

    Each build's temp area (RUN scratch directories, the overlay mounts' work dirs) then
    starts in a group of its own. That matters on ext4 without a journal, where every
    inode allocation checks, one by one, the inodes its group freed in the last minutes:
    a group that other builds or tools just cleaned up makes every RUN slower. A hint
    only: other file systems, or a refusal, change nothing.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        flags = bytearray(4)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        value = int.from_bytes(flags, sys.byteorder)
        if not value & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, (value | _FS_TOPDIR_FL).to_bytes(4, sys.byteorder))
    except OSError:
        pass
    finally:
        os.close(fd)


def _flock(kind: int, offset: int) -> bytes:
    """A ``struct flock`` for one byte at ``offset`` (l_type, l_whence, l_start, l_len,
    l_pid; l_pid must be 0 for open file description locks)."""
    return struct.pack("@hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)


# linux/fs.h: the inode flags ioctls (they read and write an int) and the Orlov hint.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def remove_tree(path: Path) -> None:
    """Remove a directory tree, including dirs that an overlay left unreadable (mode 000)."""
    if not path.is_dir() or path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    import shutil  # here: most builds have no tree to remove

    retried: set[str] = set()

    def fix_and_retry(func: Callable[..., object], p: str, exc_info: tuple[type, BaseException, object]) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        if func in (os.unlink, os.rmdir):
            with contextlib.suppress(FileNotFoundError):
                func(p)
        elif p not in retried:  # os.open, os.scandir, os.lstat: a directory it could not read
            retried.add(p)
            shutil.rmtree(p, onerror=fix_and_retry)
        elif not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(path, onerror=fix_and_retry)


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total
