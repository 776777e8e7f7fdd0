"""The cache's size and its trimming: du, prune, automatic GC after a build, check-cache.

Sizes are bytes on disk (allocated blocks), and the total is everything under the cache
root, the database included. A record owns the layers it created (and their compressed
blobs); a layer stays as long as any record's chain uses it, so pruning a step never
breaks the steps built on top of it. Prune, GC and repair hold the cache's GC lock
exclusively: they wait for (or, after a build, skip while) other builds that use the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dockbuild.config import GCConfig, GCPolicy, parse_duration
from dockbuild.engine.layers import blobs_in_use
from dockbuild.engine.store import Record, Store, remove_tree, tree_size
from dockbuild.errors import DockbuildError

RECORD_TYPES = (
    "regular",
    "source.local",
    "exec.cachemount",
    "source.git.checkout",
    "internal",
    "frontend",
)


def _blocks(path: Path | str) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:
        return 0


def human_size(n: float) -> str:
    """Decimal units, as docker and buildctl print sizes."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.4g}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1000
    return f"{n}B"


def ago(t: float, now: float | None = None) -> str:
    seconds = max(0, (now or time.time()) - t)
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


# -- the index: records, layers, blobs and who uses what ----------------------------------


@dataclass
class CacheIndex:
    store: Store
    records: dict[str, Record] = field(default_factory=dict)
    layers: set[str] = field(default_factory=set)  # every known layer, unpacked or packed
    layer_size: dict[str, int] = field(default_factory=dict)  # the unpacked ones
    blobs_of_layer: dict[str, set[str]] = field(default_factory=dict)
    blob_size: dict[str, int] = field(default_factory=dict)
    layer_refs: Counter[str] = field(default_factory=Counter)
    blob_refs: Counter[str] = field(default_factory=Counter)
    mount_size: dict[str, int] = field(default_factory=dict)  # RUN --mount=type=cache dirs
    pinned: set[str] = field(default_factory=set)  # blobs other tables use (ADD URL)

    @classmethod
    def load(cls, store: Store) -> CacheIndex:
        idx = cls(store)
        idx.records = {r.key: r for r in store.records()}
        on_disk = set(store.snapshot_ids())
        for lid, (size, _) in store.layer_rows().items():
            idx.layers.add(lid)
            if lid in on_disk:
                idx.layer_size[lid] = size
        for info in store.layer_blob_rows():
            idx.blobs_of_layer.setdefault(info.layer_id, set()).update(blobs_in_use(store, info))
        idx.pinned = store.other_blob_refs()
        for digest in store.blob_digests():
            idx.blob_size[digest] = _blocks(store.blob_path(digest))
        for r in idx.records.values():
            idx._count(r, +1)
        for r, size in _cache_mounts(store):
            idx.records[r.key] = r
            idx.mount_size[r.key] = size
        return idx

    def _count(self, r: Record, sign: int) -> None:
        for lid in set(r.layers):
            self.layer_refs[lid] += sign
            if self.layer_refs[lid] <= 0:
                del self.layer_refs[lid]
        for digest in set(r.refs):
            self.blob_refs[digest] += sign
            if self.blob_refs[digest] <= 0:
                del self.blob_refs[digest]

    def record_size(self, r: Record) -> int:
        """Bytes of what the record created: its own layers and their blobs."""
        total = self.mount_size.get(r.key, 0)
        for lid in r.owns:
            total += self.layer_size.get(lid, 0)
            total += sum(self.blob_size.get(d, 0) for d in self.blobs_of_layer.get(lid, ()))
        return total

    def shared(self, r: Record) -> bool:
        """Whether another record's chain also uses a layer this one created."""
        return any(self.layer_refs.get(lid, 0) > 1 for lid in r.owns)

    def used_bytes(self) -> int:
        """What the cache holds, from the index (cheap: no tree walk)."""
        db = sum(_blocks(p) for p in self.store.db_paths())
        return sum(self.mount_size.values()) + sum(self.layer_size.values()) + sum(self.blob_size.values()) + db

    def live_blobs(self) -> set[str]:
        live = set(self.blob_refs) | self.pinned
        for lid in self.layer_refs:
            live |= self.blobs_of_layer.get(lid, set())
        return live

    def remove(self, key: str) -> int:
        """Delete one record, then what no remaining record uses; return bytes freed."""
        r = self.records.pop(key)
        if key in self.mount_size:
            return _remove_cache_mount(self.store, key, self.mount_size.pop(key))
        self.store.delete_records([key])
        self._count(r, -1)
        freed = 0
        for lid in set(r.layers):
            if lid in self.layer_refs:
                continue  # another record's chain still uses it
            freed += self._drop_layer(lid)
        live = self.live_blobs()
        for digest in set(r.refs):
            if digest not in live:
                freed += self._drop_blob(digest)
        return freed

    def _drop_layer(self, lid: str) -> int:
        self.layers.discard(lid)
        freed = self.layer_size.pop(lid, 0)
        blobs = self.blobs_of_layer.pop(lid, set())
        if not freed:
            freed = tree_size(self.store.layer_path(lid))
        self.store.delete_layer(lid)
        live = self.live_blobs()
        for digest in blobs:
            if digest not in live:
                freed += self._drop_blob(digest)
        return freed

    def _drop_blob(self, digest: str) -> int:
        size = self.blob_size.pop(digest, 0)
        self.store.delete_blob(digest)
        return size

    def sweep(self) -> int:
        """Remove what no record uses: layers, blob files, stray directories, partial
        downloads. Only under the exclusive lock (a running build's work looks stray)."""
        freed = 0
        for lid in list(self.layers):
            if lid not in self.layer_refs:
                freed += self._drop_layer(lid)
        known = set(self.store.layer_rows())
        for name in self.store.snapshot_ids():
            if name not in known and name not in self.layer_refs:
                freed += tree_size(self.store.layer_path(name))
                self.store.remove_snapshot_dir(name)
        live = self.live_blobs()
        for digest in list(self.blob_size):
            if digest not in live:
                freed += self._drop_blob(digest)
        for lock in (self.store.root / "locks").iterdir():
            # Lock files of older dockbuilds, one per step (now byte locks in "steps").
            if lock.name not in ("gc", "steps"):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
        for part in self.store.partial_downloads():
            freed += _blocks(part)
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        return freed


_MOUNT_PREFIX = "cachemount:"


def _cache_mounts(store: Store) -> list[tuple[Record, int]]:
    """RUN --mount=type=cache directories (engine/mounts.py), as exec.cachemount records."""
    base = store.root / "mounts"
    out: list[tuple[Record, int]] = []
    if not base.is_dir():
        return out
    for home in sorted(base.iterdir()):
        if not home.is_dir():
            continue
        try:
            label = (home / "id").read_text().strip()
        except OSError:
            label = home.name
        stamps = [home.stat()]
        stamps += [p.stat() for p in home.glob("*.lock")]
        last = max(max(st.st_mtime, st.st_atime) for st in stamps)
        record = Record(
            _MOUNT_PREFIX + home.name,
            [],
            f"cache mount {label}",
            home.stat().st_ctime,
            last,
            "exec.cachemount",
            [],
            [],
            None,
        )
        out.append((record, tree_size(home) + _blocks(home)))
    return out


def _remove_cache_mount(store: Store, key: str, size: int) -> int:
    home = store.root / "mounts" / key[len(_MOUNT_PREFIX) :]
    trash = store.tempdir("m")
    with contextlib.suppress(FileNotFoundError):
        os.rename(home, trash / "home")
    remove_tree(trash)
    return size


def is_image(r: Record) -> bool:
    """A base image's layers (kept by a plain prune, as an image store would keep them)."""
    return bool(r.refs)


# -- filters (buildctl's --filter syntax) ---------------------------------------------------

_FILTER = re.compile(r"^([a-z.-]+)(==|!=|~=|=)(.*)$")


def parse_filters(texts: list[str] | tuple[str, ...]) -> tuple[Callable[[Record, float], bool], float | None]:
    """A predicate over records, and the ``until`` duration if one was given."""
    tests: list[Callable[[Record, float], bool]] = []
    until: float | None = None
    for text in texts:
        for item in (t for t in text.split(",") if t.strip()):
            m = _FILTER.match(item.strip())
            if not m:
                raise DockbuildError(
                    f"invalid filter {item!r}",
                    hint="use type==regular, id=PREFIX, description~=REGEX or until=24h",
                )
            name, op, value = m.groups()
            if name == "until":
                until = parse_duration(value, "until")
                continue
            if name == "type" and op in ("=", "==", "!=") and value not in RECORD_TYPES:
                raise DockbuildError(
                    f"invalid filter {item!r}: unknown record type", hint="one of " + ", ".join(RECORD_TYPES)
                )
            tests.append(_field_test(name, op, value, item))
    return (lambda r, now: all(t(r, now) for t in tests)), until


def _field_test(name: str, op: str, value: str, item: str) -> Callable[[Record, float], bool]:
    getters: dict[str, Callable[[Record], str]] = {
        "type": lambda r: r.type,
        "id": lambda r: short_id(r.key),
        "description": lambda r: r.description,
    }
    if name not in getters:
        raise DockbuildError(f"invalid filter {item!r}: unknown key {name!r}", hint="type, id, description, until")
    get = getters[name]
    if op == "~=":
        try:
            rx = re.compile(value)
        except re.error as e:
            raise DockbuildError(f"invalid filter {item!r}: {e}") from None
        return lambda r, now: bool(rx.search(get(r)))
    if op == "!=":
        return lambda r, now: get(r) != value
    if name == "id":
        return lambda r, now: get(r).startswith(value) or r.key.partition(":")[2].startswith(value)
    if name == "description" and op == "=":
        return lambda r, now: value in get(r)
    return lambda r, now: get(r) == value


def short_id(key: str) -> str:
    return key.partition(":")[2][:25] or key


# -- du ---------------------------------------------------------------------------------------


@dataclass
class DiskUsage:
    rows: list[tuple[Record, int, bool]]  # record, size, shared
    database: int
    temporary: int
    unreferenced: int
    total: int

    @property
    def reclaimable(self) -> int:
        return self.total - self.database


def disk_usage(store: Store, filters: list[str] | tuple[str, ...] = ()) -> DiskUsage:
    match, until = parse_filters(filters)
    now = time.time()
    idx = CacheIndex.load(store)
    rows = []
    for r in idx.records.values():
        if not match(r, now) or (until is not None and r.last_used > now - until):
            continue
        rows.append((r, idx.record_size(r), idx.shared(r)))
    rows.sort(key=lambda row: (-row[1], row[0].last_used))
    database = sum(_blocks(p) for p in store.db_paths())
    temporary = tree_size(store.root / "tmp") + sum(_blocks(p) for p in store.partial_downloads())
    total = tree_size(store.root) + _blocks(store.root)
    live = sum(idx.layer_size.get(lid, 0) for lid in idx.layer_refs)
    live += sum(idx.blob_size.get(d, 0) for d in idx.live_blobs())
    live += sum(idx.mount_size.values())
    unreferenced = max(0, total - database - temporary - live - _locks_size(store))
    return DiskUsage(rows, database, temporary, unreferenced, total)


def _locks_size(store: Store) -> int:
    return tree_size(store.root / "locks") + sum(
        _blocks(store.root / d) for d in ("blobs", "blobs/sha256", "snapshots", "tmp", "locks")
    )


# -- prune ------------------------------------------------------------------------------------


@dataclass
class PruneResult:
    removed: list[tuple[Record, int]]  # record, bytes it held
    freed: int  # bytes on disk before minus after


def prune(
    store: Store,
    *,
    all_: bool = False,
    filters: list[str] | tuple[str, ...] = (),
    keep_duration: float | None = None,
    keep_storage: int | None = None,
    wait: bool = True,
) -> PruneResult | None:
    """Remove cache records (least recently used first) and what only they used.

    Without ``all_``, base images stay. ``keep_duration`` keeps records used within that
    many seconds; ``keep_storage`` stops once the cache is no bigger than that. Returns
    None when ``wait`` is False and another process is using the cache.
    """
    match, until = parse_filters(filters)
    with store.exclusive(wait=wait) as held:
        if not held:
            return None
        before = _root_bytes(store)
        idx = CacheIndex.load(store)
        now = time.time()
        keep_after = now - max(keep_duration or 0, until or 0)
        candidates = [
            r
            for r in sorted(idx.records.values(), key=lambda r: (r.last_used, r.key))
            if (all_ or not is_image(r)) and match(r, now) and r.last_used <= keep_after
        ]
        removed = []
        idx.sweep()
        for r in candidates:
            if keep_storage is not None and idx.used_bytes() <= keep_storage:
                break
            removed.append((r, idx.record_size(r)))
            idx.remove(r.key)
        everything = all_ and not filters and keep_storage is None and not keep_duration
        if everything:
            store.delete_resolutions()
            store.forget_downloads()
            idx.pinned = set()
        idx.sweep()
        _prune_rows(store, everything)
        _prune_kept_rootfs(store, stale_only=False)
        store.checkpoint()
        return PruneResult(removed, max(0, before - _root_bytes(store)))


def _prune_rows(store: Store, everything: bool = False) -> None:
    """The cache db's rows that only speed builds up and would otherwise only grow: the
    result records whose image lost a layer (dockbuild/resultcache.py) and the records
    of local exports (outputs/local.py) whose destination is gone; all of both with
    ``everything``. Never a reason for prune to fail: they are checked on every use."""
    import sqlite3

    from dockbuild import resultcache

    db = store.root / "db.sqlite"
    with contextlib.suppress(sqlite3.Error):
        resultcache.prune(db, store.has_layer, everything)
    conn = sqlite3.connect(db, timeout=60, isolation_level=None)
    try:
        rows = conn.execute("SELECT dest FROM local_exports").fetchall()
        gone = [(dest,) for (dest,) in rows if everything or not os.path.isdir(dest)]
        conn.executemany("DELETE FROM local_exports WHERE dest=?", gone)
    except sqlite3.Error:
        pass  # no local export yet: no table
    finally:
        conn.close()


def _prune_kept_rootfs(store: Store, *, stale_only: bool) -> None:
    """The copy snapshotter's kept working rootfs dirs: all, or those whose layers went."""
    from dockbuild.engine.snapshotter.copy import KEPT_DIR, prune_kept

    if (store.root / KEPT_DIR).is_dir():
        prune_kept(store.root, store.tempdir("k"), stale_only=stale_only)


def _root_bytes(store: Store) -> int:
    return tree_size(store.root) + _blocks(store.root)


# -- automatic GC ---------------------------------------------------------------------------


def collect(store: Store, config: GCConfig, *, wait: bool = False) -> PruneResult | None:
    """Apply the ordered GC policies, as buildkitd does, least recently used first.

    For each policy: the records it may delete (its filters; base images only with
    ``all``; not used within ``keepDuration``) go, oldest first, while the cache is above
    the policy's target: ``maxUsedSpace``, or what ``minFreeSpace`` asks for, but never
    below ``reservedSpace``. A policy with only ``keepDuration`` deletes down to
    ``reservedSpace``. Returns None when another build is using the cache (GC skipped).
    """
    if not config.enabled:
        return PruneResult([], 0)
    with store.exclusive(wait=wait) as held:
        if not held:
            return None
        disk = shutil.disk_usage(store.root)
        idx = CacheIndex.load(store)
        before = idx.used_bytes()
        idx.sweep()
        removed: list[tuple[Record, int]] = []
        now = time.time()
        for policy in config.policies:
            target = _target(policy, config, idx.used_bytes(), disk.total, disk.free)
            match, _ = parse_filters(policy.filters)
            for r in sorted(idx.records.values(), key=lambda r: (r.last_used, r.key)):
                if idx.used_bytes() <= target:
                    break
                if not (policy.all or not is_image(r)) or not match(r, now):
                    continue
                if policy.keep_duration and r.last_used > now - policy.keep_duration:
                    continue
                removed.append((r, idx.record_size(r)))
                freed = idx.remove(r.key)
                disk = disk._replace(free=disk.free + freed)
        if removed:
            idx.sweep()
            _prune_rows(store)
            _prune_kept_rootfs(store, stale_only=True)
            store.checkpoint()
        return PruneResult(removed, max(0, before - idx.used_bytes()))


def _target(policy: GCPolicy, config: GCConfig, used: int, total: int, free: int) -> int:
    reserved_cap, max_cap = config.caps
    reserved = (policy.reserved_space or config.reserved_space).resolve(total)
    if policy.reserved_space is None:
        reserved = min(reserved, reserved_cap)
    max_used = policy.max_used_space or (config.max_used_space if not policy.keep_duration else None)
    min_free = policy.min_free_space or (config.min_free_space if not policy.keep_duration else None)
    limits = []
    if max_used is not None:
        limit = max_used.resolve(total)
        if policy.max_used_space is None:
            limit = min(limit, max_cap)
        limits.append(limit)
    if min_free is not None:
        need = min_free.resolve(total) - free
        if need > 0:
            limits.append(used - need)
    if not limits:
        limits.append(reserved)
    return max(min(limits), reserved)


# -- check-cache ------------------------------------------------------------------------------


@dataclass
class Problem:
    what: str
    repair: Callable[[], None]


def check(store: Store, *, repair: bool = False) -> list[str]:
    """Verify every blob against its digest and every record against its layers.

    Returns the problems found (each line says what was done with ``repair``). Holds the
    exclusive lock, so it waits for running builds.
    """
    with store.exclusive(wait=True):
        problems: list[Problem] = []
        for err in store.integrity_errors():
            problems.append(Problem(f"database: {err}", lambda: None))
        layer_rows = store.layer_rows()
        on_disk = set(store.snapshot_ids())
        bad_blobs: set[str] = set()
        users: dict[str, list[str]] = {}
        for info in store.layer_blob_rows():
            users.setdefault(info.digest, []).append(info.layer_id)
        for digest in store.blob_digests():
            got = _sha256(store.blob_path(digest))
            if got != digest:
                bad_blobs.add(digest)
                problems.append(
                    Problem(
                        f"blob {digest}: content has digest {got}",
                        lambda d=digest: _drop_blob_and_layers(store, d, users.get(d, [])),  # type: ignore[misc]  # a lambda with a default (the loop value)
                    )
                )
        present = set(store.blob_digests()) - bad_blobs
        for info in store.layer_blob_rows():
            if info.digest not in present and info.digest not in bad_blobs:
                problems.append(
                    Problem(
                        f"layer {info.layer_id}: its {info.compression} blob {info.digest} is missing",
                        lambda d=info.digest: store.delete_blob(d),  # type: ignore[misc]  # a lambda with a default (the loop value)
                    )
                )
        # A layer without its directory is fine while its blob is here (a packed layer,
        # unpacked when a step reads it); without either, it is lost.
        packed = {lid for lid in layer_rows if lid not in on_disk and store.packed_blob(lid)}
        for lid in layer_rows:
            if lid not in on_disk and lid not in packed:
                problems.append(
                    Problem(f"layer {lid}: directory missing", lambda lid=lid: store.delete_layer(lid))  # type: ignore[misc]  # a lambda with a default (the loop value)
                )
        referenced = set()
        for r in store.records():
            referenced |= set(r.layers)
            missing = [lid for lid in r.layers if lid not in on_disk and lid not in packed]
            if missing:
                problems.append(
                    Problem(
                        f"record {short_id(r.key)} ({r.description}): layers missing: {', '.join(missing)}",
                        lambda k=r.key: store.delete_records([k]),  # type: ignore[misc]  # a lambda with a default (the loop value)
                    )
                )
        for name in sorted(on_disk):
            if name not in layer_rows and name not in referenced:
                problems.append(
                    Problem(
                        f"snapshot {name}: a layer directory no record knows (a killed build's)",
                        lambda n=name: store.remove_snapshot_dir(n),  # type: ignore[misc]  # a lambda with a default (the loop value)
                    )
                )
        for part in store.partial_downloads():
            problems.append(
                Problem(
                    f"partial download {part.name}",
                    lambda p=part: p.unlink(missing_ok=True),  # type: ignore[misc]  # a lambda with a default (the loop value)
                )
            )
        for entry in (store.root / "tmp").iterdir():
            if entry != store._tmp:  # under the exclusive lock no other build runs
                problems.append(
                    Problem(f"temp {entry.name}: left by a killed build", lambda e=entry: remove_tree(e))  # type: ignore[misc]  # a lambda with a default (the loop value)
                )
        if repair:
            for p in problems:
                p.repair()
            store.checkpoint()
        return [p.what for p in problems]


def _drop_blob_and_layers(store: Store, digest: str, layers: list[str]) -> None:
    """A corrupt blob goes with the layers made from it (a base image's layer is pulled
    again, not rebuilt into a different blob) and the records that use them."""
    store.delete_blob(digest)
    doomed = set(layers)
    store.delete_records([r.key for r in store.records() if doomed & set(r.layers)])
    for lid in doomed:
        store.delete_layer(lid)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
