"""The cache exporter: a type=local export read back into a fresh store gives every step
as a cache hit, with the same layers; file steps only, so no container is needed."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockbuild import llb
from dockbuild.engine import cacheio
from dockbuild.engine.registry.manifest import Descriptor, ResolvedImage
from dockbuild.engine.solver import Solver
from dockbuild.engine.sources.image import ImageSources
from dockbuild.engine.sources.local import LocalDir
from dockbuild.engine.store import Store
from dockbuild.errors import DockbuildError
from dockbuild.progress import Progress, RawJSONRenderer

CONTEXT = llb.SourceOp("local://context")


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    (root / "src").mkdir(parents=True)
    (root / "src" / "app.py").write_text("print('hello')\n")
    (root / "notes.txt").write_text("notes\n")
    return root


def graph() -> llb.Op:
    """base <- COPY src/ <- mkdir, and a side branch read by a COPY --from."""
    base = llb.FileOp(None, (llb.Mkfile("/etc/os-release", b"ID=test\n"),), name="base")
    side = llb.FileOp(None, (llb.Mkfile("/built", b"from the side\n"),), name="side")
    app = llb.FileOp(base, (llb.Copy(CONTEXT, "src", "/app/"),), name="copy src")
    with_side = llb.FileOp(app, (llb.Copy(side, "/built", "/app/built"),), name="copy --from=side")
    return llb.FileOp(with_side, (llb.Mkdir("/var/run/app"),), name="mkdir")


class Build:
    """One build: a store, a solver and its progress."""

    def __init__(self, root: Path, ctx: Path) -> None:
        self.store = Store(root)
        self.progress = Progress(RawJSONRenderer(io.StringIO()))
        self.solver = Solver(
            self.store,
            self.progress,
            {"context": LocalDir(ctx)},
            ImageSources(self.store),
            lambda: pytest.fail("file steps need no executor"),  # type: ignore[arg-type, return-value]  # never called
        )

    def statuses(self) -> dict[str, str]:
        return {v.name: v.status for v in self.progress.vertices}

    def files(self, state: tuple[str, ...], path: str) -> bytes:
        for layer in reversed(self.store.unpacked_paths(state)):
            if (layer / path).is_file():
                return (layer / path).read_bytes()
        raise FileNotFoundError(path)

    def close(self) -> None:
        self.solver.close()
        self.store.close()


@pytest.fixture
def builds() -> Iterator[list[Build]]:
    """The builds a test makes, closed after it."""
    made: list[Build] = []
    yield made
    for build in made:
        build.close()


def export(build: Build, root: llb.Op, dest: Path, mode: str) -> None:
    spec = cacheio.parse_cache_spec(f"type=local,dest={dest},mode={mode}", export=True)
    cacheio.export_cache(build.store, build.solver, [root], [spec], build.progress)


def import_(build: Build, root: llb.Op, src: Path) -> int:
    spec = cacheio.parse_cache_spec(f"type=local,src={src}", export=False)
    sources = cacheio.open_sources([spec], lambda: None, build.progress)()
    return cacheio.import_cache(build.store, build.solver, root, sources, build.progress)


def test_an_exported_cache_makes_every_step_a_hit_in_a_fresh_store(
    tmp_path: Path, ctx: Path, builds: list[Build]
) -> None:
    root = graph()
    first = Build(tmp_path / "first", ctx)
    builds.append(first)
    state = first.solver.solve(root)
    assert set(first.statuses().values()) == {"done"}
    export(first, root, tmp_path / "cache", "max")

    fresh = Build(tmp_path / "fresh", ctx)
    builds.append(fresh)
    assert import_(fresh, root, tmp_path / "cache") >= 1
    assert fresh.solver.solve(root) == state
    solved = {
        name: status
        for name, status in fresh.statuses().items()
        if not name.startswith("importing")
    }
    assert solved and set(solved.values()) == {"cached"}
    assert fresh.files(state, "app/app.py") == b"print('hello')\n"
    assert fresh.files(state, "app/built") == b"from the side\n"


def test_an_imported_record_and_its_layers_keep_the_exporters_creation_times(
    tmp_path: Path, ctx: Path, builds: list[Build]
) -> None:
    root = graph()
    first = Build(tmp_path / "first", ctx)
    builds.append(first)
    state = first.solver.solve(root)
    export(first, root, tmp_path / "cache", "max")

    fresh = Build(tmp_path / "fresh", ctx)
    builds.append(fresh)
    import_(fresh, root, tmp_path / "cache")
    assert state and [fresh.store.layer_created(lid) for lid in state] == [first.store.layer_created(lid) for lid in state]
    key = first.solver.keys.key(root)
    made, got = first.store.record(key), fresh.store.record(key)
    assert made is not None and got is not None and got.created == made.created
    assert fresh.solver.solve(root) == state
    assert [fresh.solver.layer_made(op) for op in (root, root.base)] == [first.solver.layer_made(op) for op in (root, root.base)]


def test_min_mode_leaves_out_steps_the_result_is_not_built_on(
    tmp_path: Path, ctx: Path, builds: list[Build]
) -> None:
    root = graph()
    side = llb.FileOp(None, (llb.Mkfile("/built", b"from the side\n"),), name="side")
    first = Build(tmp_path / "first", ctx)
    builds.append(first)
    first.solver.solve(root)
    export(first, root, tmp_path / "min", "min")

    fresh = Build(tmp_path / "fresh", ctx)
    builds.append(fresh)
    import_(fresh, side, tmp_path / "min")
    assert fresh.store.get_record(fresh.solver.keys.key(side)) is None
    import_(fresh, root, tmp_path / "min")
    assert fresh.store.get_record(fresh.solver.keys.key(root)) is not None


def test_an_imported_cache_serves_only_the_steps_whose_inputs_are_unchanged(
    tmp_path: Path, ctx: Path, builds: list[Build]
) -> None:
    root = graph()
    first = Build(tmp_path / "first", ctx)
    builds.append(first)
    first.solver.solve(root)
    export(first, root, tmp_path / "cache", "max")

    (ctx / "src" / "app.py").write_text("print('changed')\n")
    fresh = Build(tmp_path / "fresh", ctx)
    builds.append(fresh)
    import_(fresh, root, tmp_path / "cache")
    state = fresh.solver.solve(root)
    statuses = fresh.statuses()
    assert statuses["base"] == "cached"
    assert statuses["copy src"] == statuses["copy --from=side"] == statuses["mkdir"] == "done"
    assert fresh.files(state, "app/app.py") == b"print('changed')\n"


def test_a_tampered_layer_blob_is_refused_and_nothing_is_recorded(
    tmp_path: Path, ctx: Path, builds: list[Build]
) -> None:
    root = graph()
    first = Build(tmp_path / "first", ctx)
    builds.append(first)
    first.solver.solve(root)
    export(first, root, tmp_path / "cache", "max")
    blobs = (tmp_path / "cache" / "blobs" / "sha256").iterdir()
    layer_blobs = [p for p in blobs if p.read_bytes()[:2] == b"\x1f\x8b"]  # gzip: the layers
    assert layer_blobs
    for blob in layer_blobs:
        blob.write_bytes(blob.read_bytes()[:-8] + b"tampered")

    fresh = Build(tmp_path / "fresh", ctx)
    builds.append(fresh)
    with pytest.raises(DockbuildError, match="is corrupt"):
        import_(fresh, root, tmp_path / "cache")
    assert fresh.store.records() == []


def _inline_image(history: list[dict[str, object]]) -> ResolvedImage:
    """An image of two layers whose config carries an inline cache of two records."""
    import json

    ids, diff_ids = ["a" * 20, "b" * 20], ["sha256:" + "1" * 64, "sha256:" + "2" * 64]
    config = {
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
        "dockbuild.cache.inline.v1": {
            "layers": ids,
            "records": [{"key": "k1", "layers": 1, "description": "FROM", "type": "regular", "owns": [], "refs": []},
                        {"key": "k2", "layers": 2, "description": "RUN", "type": "regular", "owns": [ids[1]], "refs": []}],
        },
    }  # fmt: skip
    layers = tuple(Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", "sha256:" + c * 64, 10) for c in "cd")
    return ResolvedImage(None, "sha256:" + "e" * 64, b"{}", "", "sha256:" + "f" * 64, json.dumps(config).encode(), layers, "linux/amd64")


def test_an_inline_cache_dates_its_layers_and_records_by_the_images_history() -> None:
    history: list[dict[str, object]] = [
        {"created": "2024-01-02T03:04:05Z"},
        {"created": "2026-12-06T10:00:00.25Z", "empty_layer": True},  # ENV: no layer
        {"created": "2026-12-06T10:00:01.123456Z"},
    ]
    data = cacheio._inline_as_export(_inline_image(history))["dockbuild.cache.v1"]
    assert [layer["created"] for layer in data["layers"]] == [1704164645.0, 1796551201.123456]
    assert [record["created"] for record in data["records"]] == [1704164645.0, 1796551201.123456]
    assert [record["layers"] for record in data["records"]] == [["a" * 20], ["a" * 20, "b" * 20]]


@pytest.mark.parametrize(
    "history",
    [
        [{"created": "2024-01-02T03:04:05Z"}],  # fewer entries with a layer than layers
        [{"created": "2024-01-02T03:04:05Z"}, {"created": "yesterday"}],
        [{"created": "2024-01-02T03:04:05Z"}, {"created": "2026-12-06T10:00:01"}],  # no time zone
        [],
    ],
)
def test_an_inline_cache_whose_history_does_not_give_the_times_still_imports_undated(
    history: list[dict[str, object]],
) -> None:
    data = cacheio._inline_as_export(_inline_image(history))["dockbuild.cache.v1"]
    assert len(data["records"]) == 2 and len(data["layers"]) == 2
    times = [cacheio._created(entry) for entry in [*data["layers"], *data["records"]]]
    assert times[1] is None and times[3] is None  # dated by the import
