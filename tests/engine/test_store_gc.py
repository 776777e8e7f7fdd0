"""The store's records, reference counting under prune, GC targets and the config keys."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from dockbuild.config import GCConfig, GCPolicy, Size, gc_config, parse_duration, parse_size
from dockbuild.engine import gc
from dockbuild.engine.store import SCHEMA_VERSION, Store
from dockbuild.errors import DockbuildError


def _layer(store: Store, lid: str, size: int = 10_000) -> None:
    work = store.tempdir()
    (work / "f").write_bytes(b"x" * size)
    store.commit_layer(lid, work)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "root")
    yield s  # type: ignore[misc]
    s.close()


def test_pruning_a_record_keeps_a_layer_another_record_still_uses(store: Store) -> None:
    _layer(store, "base")
    _layer(store, "top")
    store.put_record("sha256:a", ["base"], "step a", owns=["base"])
    store.put_record("sha256:b", ["base", "top"], "step b", owns=["top"])
    result = gc.prune(store, filters=["description=step a"])
    assert result is not None and [r.key for r, _ in result.removed] == ["sha256:a"]
    assert store.has_layer("base") and store.get_record("sha256:b") == ["base", "top"]
    gc.prune(store, all_=True)
    assert not store.has_layer("base") and not store.has_layer("top")
    assert store.records() == []


def test_prune_keep_storage_goes_least_recently_used_first(store: Store) -> None:
    for name in ("old", "mid", "new"):
        _layer(store, name, 200_000)
        store.put_record(f"sha256:{name}", [name], name, owns=[name])
        store.touch_record(f"sha256:{name}")
    idx = gc.CacheIndex.load(store)
    keep = idx.used_bytes() - 150_000
    result = gc.prune(store, keep_storage=keep)
    assert result is not None and [r.description for r, _ in result.removed] == ["old"]
    assert store.has_layer("mid") and store.has_layer("new")


def test_gc_deletes_down_to_max_used_space_but_never_below_reserved(store: Store) -> None:
    for n in range(4):
        _layer(store, f"l{n}", 300_000)
        store.put_record(f"sha256:{n}", [f"l{n}"], f"step {n}", owns=[f"l{n}"])
    used = gc.CacheIndex.load(store).used_bytes()
    config = GCConfig(
        max_used_space=Size(used - 400_000),
        reserved_space=Size(0),
        min_free_space=Size(0),
        policies=(GCPolicy(),),
    )
    result = gc.collect(store, config, wait=True)
    assert result is not None and [r.description for r, _ in result.removed] == ["step 0", "step 1"]
    reserved = GCConfig(
        max_used_space=Size(0), reserved_space=Size(used), min_free_space=Size(0), policies=(GCPolicy(),)
    )
    assert gc.collect(store, reserved, wait=True).removed == []  # type: ignore[union-attr]


def test_gc_keeps_base_images_unless_a_policy_says_all(store: Store) -> None:
    _layer(store, "img")
    store.put_record("sha256:img", ["img"], "FROM busybox", owns=["img"], refs=["sha256:" + "0" * 64])
    tiny = GCConfig(max_used_space=Size(1), reserved_space=Size(0), min_free_space=Size(0), policies=(GCPolicy(),))
    assert gc.collect(store, tiny, wait=True).removed == []  # type: ignore[union-attr]
    everything = GCConfig(max_used_space=Size(1), reserved_space=Size(0), min_free_space=Size(0),
                          policies=(GCPolicy(all=True),))  # fmt: skip
    assert len(gc.collect(store, everything, wait=True).removed) == 1  # type: ignore[union-attr]


def test_an_older_cache_database_gains_the_new_columns(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    db = sqlite3.connect(root / "db.sqlite")
    db.execute(
        "CREATE TABLE records (key TEXT PRIMARY KEY, layers TEXT NOT NULL, description TEXT NOT NULL,"
        " created REAL NOT NULL, last_used REAL NOT NULL)"
    )
    db.execute("INSERT INTO records VALUES ('sha256:k', '[]', 'old step', 1, 1)")
    db.commit()
    db.close()
    store = Store(root)
    try:
        (record,) = store.records()
        assert record.type == "regular" and record.owns == [] and record.inputs is None
        store.put_record("sha256:new", [], "new step", type="source.local", inputs={"files": []})
        assert store.record("sha256:new").type == "source.local"  # type: ignore[union-attr]
    finally:
        store.close()
    db = sqlite3.connect(root / "db.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_sizes_and_durations_read_as_buildkitd_toml_spells_them() -> None:
    assert parse_size("512MB").bytes == 512 << 20
    assert parse_size("10GiB").bytes == 10 << 30
    assert parse_size(1024).bytes == 1024
    assert parse_size("30%").resolve(1000) == 300
    assert parse_duration("48h") == 172800
    assert parse_duration("1h30m") == 5400
    assert parse_duration("7d") == 604800
    assert parse_duration(60) == 60
    with pytest.raises(DockbuildError, match="invalid size"):
        parse_size("lots")
    with pytest.raises(DockbuildError, match="invalid duration"):
        parse_duration("soon")


def test_gc_config_reads_a_buildkitd_worker_section_and_ordered_policies() -> None:
    config = gc_config(
        {
            "worker": {
                "oci": {
                    "gc": True,
                    "maxUsedSpace": "20GB",
                    "gcpolicy": [
                        {"filters": ["type==exec.cachemount"], "keepDuration": "48h", "keepBytes": "512MB"},
                        {"all": True, "reservedSpace": "1GB"},
                    ],
                }
            }
        }
    )
    assert config.enabled and config.max_used_space.bytes == 20 << 30
    first, second = config.policies
    assert first.filters == ("type==exec.cachemount",) and first.keep_duration == 172800
    assert first.reserved_space == Size(512 << 20)
    assert second.all and second.reserved_space == Size(1 << 30)
    assert not gc_config({"cache": {"gc": False}}).enabled
    assert len(gc_config({}).policies) == 4  # BuildKit's defaults


def test_filters_select_records_as_buildctl_does() -> None:
    from dockbuild.engine.store import Record

    rec = Record("sha256:abcdef", [], "[2/3] RUN make", 0, 0, "regular", [], [], None)
    match, until = gc.parse_filters(["type==regular", "description~=RUN m"])
    assert match(rec, 0) and until is None
    assert not gc.parse_filters(["type!=regular"])[0](rec, 0)
    assert gc.parse_filters(["id=abc"])[0](rec, 0)
    assert gc.parse_filters(["until=2h"])[1] == 7200
    with pytest.raises(DockbuildError, match="unknown record type"):
        gc.parse_filters(["type==bogus"])


def _layer_blob(store: Store, files: dict[str, bytes]) -> tuple[str, int, str]:
    """A gzip layer blob in the store: (digest, size, diff_id)."""
    import gzip
    import hashlib
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = gzip.compress(raw.getvalue(), mtime=0)
    digest = store.put_blob_bytes(blob)
    return digest, len(blob), "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()


def test_a_packed_layer_is_unpacked_on_first_read_and_checked_against_its_diff_id(store: Store) -> None:
    from dockbuild.engine.store import BlobInfo
    from dockbuild.errors import DigestMismatchError

    digest, size, diff_id = _layer_blob(store, {"etc/app.conf": b"x" * 5000})
    store.add_packed_layer(BlobInfo("a" * 20, "gzip", digest, size), diff_id)
    assert store.has_layer("a" * 20) and not store.layer_path("a" * 20).exists()
    assert store.layer_rows()["a" * 20][0] == 0  # nothing on disk but the blob yet
    (path,) = store.unpacked_paths(["a" * 20])
    assert (path / "etc" / "app.conf").read_bytes() == b"x" * 5000
    assert store.layer_rows()["a" * 20][0] > 0  # du now counts the directory

    other, other_size, _ = _layer_blob(store, {"f": b"y"})
    store.add_packed_layer(BlobInfo("b" * 20, "gzip", other, other_size), diff_id)  # a lying diff_id
    with pytest.raises(DigestMismatchError, match="uncompressed content is"):
        store.unpacked_paths(["a" * 20, "b" * 20])
    assert not store.layer_path("b" * 20).exists()
    assert list((store.root / "tmp").glob("*/u*")) == []  # the half-unpacked work is gone


def test_a_step_lock_excludes_threads_and_processes_per_key_and_makes_no_file(store: Store) -> None:
    import multiprocessing
    import threading

    events: list[str] = []
    a_holds, release_a, b_tries = threading.Event(), threading.Event(), threading.Event()

    def hold(name: str, key: str, holding: threading.Event | None = None) -> None:
        if name == "b":
            b_tries.set()
        with store.lock(key):
            events.append(f"{name} in")
            if holding is not None:
                holding.set()
                assert release_a.wait(60)
            events.append(f"{name} out")

    first = threading.Thread(target=hold, args=("a", "key-1", a_holds))
    first.start()
    assert a_holds.wait(60)
    same = threading.Thread(target=hold, args=("b", "key-1"))
    other = threading.Thread(target=hold, args=("c", "key-2"))
    same.start()
    other.start()
    other.join(60)
    assert events == ["a in", "c in", "c out"]  # another key does not wait for a
    assert b_tries.wait(60)
    release_a.set()
    for t in (first, same):
        t.join(60)
    assert events.index("b in") > events.index("a out")  # the same key waits for a

    # Another process waits too. (Forked before the lock is taken: a forked child would
    # share the locked descriptor, as with flock.)
    ctx = multiprocessing.get_context("fork")
    go, done = ctx.Event(), ctx.Event()

    def child() -> None:
        go.wait(60)
        with store.lock("key-1"):
            done.set()

    process = ctx.Process(target=child)
    process.start()
    with store.lock("key-1"):
        go.set()
        assert not done.wait(0.3)  # (a slow child makes this pass too, never fail)
    assert done.wait(60)
    process.join(60)
    assert sorted(p.name for p in (store.root / "locks").iterdir()) == ["db-init", "gc", "steps"]


def test_remove_tree_retries_a_directory_it_could_not_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rmtree reports a directory it cannot open with os.open as the failed call: the retry
    must remove that subtree, not call os.open(path) without flags (a TypeError that once
    turned an interrupted build's clean-up into an internal error)."""
    from dockbuild.engine.store import remove_tree

    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    real_open = os.open
    refused: list[str] = []

    def open_refusing_b_once(path: str, *args: object, **kwargs: object) -> int:
        if str(path).endswith("b") and not refused:
            refused.append(str(path))
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]  # os.open's own arguments

    monkeypatch.setattr(os, "open", open_refusing_b_once)
    remove_tree(tree)
    assert refused and not tree.exists()


def test_gc_drops_the_result_records_whose_image_lost_a_layer(store: Store) -> None:
    """The result record (dockbuild/resultcache.py) of an image whose layer GC removed
    can never answer again: GC deletes its row, and keeps the others."""
    from dockbuild import resultcache

    for name in ("gone", "kept"):
        _layer(store, name, 300_000)
        store.put_record(f"sha256:{name}", [name], name, owns=[name])
    store.touch_record("sha256:kept")  # "gone" is the least recently used
    results = resultcache.ResultCache(store.root / "db.sqlite")
    for name in ("gone", "kept"):
        results.put(f"key-{name}", resultcache.Result({"state": [name]}, {}, [], [], [], []))
    used = gc.CacheIndex.load(store).used_bytes()
    config = GCConfig(
        max_used_space=Size(used - 200_000), reserved_space=Size(0), min_free_space=Size(0), policies=(GCPolicy(),)
    )
    result = gc.collect(store, config, wait=True)
    assert result is not None and [r.key for r, _ in result.removed] == ["sha256:gone"]
    assert results.get("key-gone") is None
    assert results.get("key-kept") is not None
    results.close()


def _open_store(root: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        Store(Path(root))
        results.put("ok")
    except DockbuildError as e:
        results.put(e.message)


def test_processes_opening_a_fresh_cache_root_together_all_get_it(tmp_path: Path) -> None:
    # Concurrent builds on a new cache root: SQLite refused all but one switch of the new
    # database to WAL with "database is locked" (5 of 30 rounds of 6 processes failed; this test failed twice of two).
    import multiprocessing

    context = multiprocessing.get_context("fork")
    failures = []
    for round_ in range(30):
        root = tmp_path / f"root{round_}"
        barrier, results = context.Barrier(6), context.Queue()
        processes = [context.Process(target=_open_store, args=(str(root), barrier, results)) for _ in range(6)]
        for process in processes:
            process.start()
        answers = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join()
        failures += [a for a in answers if a != "ok"]
    assert failures == []
