"""The solver's scheduling and cancellation, on real ops: a busybox rootfs copied from a
local directory, RUN steps in the real executor, and steps that meet through a shared
cache mount (each waits there for the other) instead of timing."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockbuild import llb
from dockbuild.engine.executor.choice import get_executor
from dockbuild.engine.solver import SolveOptions, Solver
from dockbuild.engine.sources.image import ImageSources
from dockbuild.engine.sources.local import LocalDir
from dockbuild.engine.store import Store
from dockbuild.errors import ExecError
from dockbuild.progress import Progress, Renderer, Vertex

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "touch", "sleep", "cat", "echo", "[", "test")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not BUSYBOX.exists(), reason="needs root and /bin/busybox"
)


class Recorder(Renderer):
    """Keeps every event, and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, str]]] = []
        self._changed = threading.Condition()

    def event(self, event: str, vertex: Vertex, extra: dict[str, str]) -> None:
        with self._changed:
            self.events.append((event, vertex.name, extra))
            self._changed.notify_all()

    def message(self, text: str) -> None:
        pass

    def of(self, name: str) -> list[str]:
        return [event for event, vertex, _ in self.events if vertex == name]

    def wait_for(self, event: str, name: str) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: event in self.of(name), timeout=60)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "root")
    yield s
    s.close()


@pytest.fixture
def rootfs(tmp_path: Path) -> tuple[dict[str, LocalDir], llb.FileOp]:
    """A busybox root as a local context, and the op that copies it into a layer."""
    root = tmp_path / "busybox"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    copy = llb.Copy(llb.SourceOp("local://rootfs"), "/", "/")
    return {"rootfs": LocalDir(root)}, llb.FileOp(None, (copy,), name="rootfs")


def solver(
    store: Store, locals_: dict[str, LocalDir], max_parallel: int
) -> tuple[Solver, Recorder]:
    recorder = Recorder()
    made = Solver(
        store,
        Progress(recorder),
        locals_,
        ImageSources(store),
        lambda: get_executor(None),
        SolveOptions(max_parallel=max_parallel),
    )
    return made, recorder


def step(base: llb.Op, name: str, script: str, *mounts: llb.Mount) -> llb.ExecOp:
    """A RUN step with the cache mount ``/c`` every step of a test shares."""
    return llb.ExecOp(
        mounts=(
            llb.Mount("/", base, output=True),
            llb.Mount("/c", type="cache", cache_id="meet"),
            *mounts,
        ),
        args=("/bin/sh", "-c", script),
        name=name,
    )


def wait_for(path: str, tenths: int) -> str:
    return f"i=0; until [ -e {path} ] || [ $i -ge {tenths} ]; do sleep 0.1; i=$((i+1)); done"


def read(store: Store, state: tuple[str, ...], path: str) -> str:
    """A file of a solved state (the topmost layer that has it)."""
    for lid in reversed(state):
        if (store.layer_path(lid) / path).exists():
            return (store.layer_path(lid) / path).read_text()
    raise FileNotFoundError(path)


@pytest.mark.parametrize(("limit", "tenths"), [(2, 1200), (1, 10)])
def test_independent_steps_run_at_once_up_to_the_limit(
    store: Store, rootfs: tuple[dict[str, LocalDir], llb.FileOp], limit: int, tenths: int
) -> None:
    locals_, base = rootfs
    a, b = (
        step(base, me, f"touch /c/{me} && {wait_for(f'/c/{other}', tenths)} && ls /c > /seen-{me}")
        for me, other in (("a", "b"), ("b", "a"))
    )
    run, _ = solver(store, locals_, limit)
    try:
        state = run.solve(llb.MergeOp((a, b)))
    finally:
        run.close()
    seen = [read(store, state, f"seen-{me}").split() for me in "ab"]
    if limit == 2:
        assert seen == [["a", "b"], ["a", "b"]]  # each saw the other running
    else:
        assert sorted(map(len, seen)) == [1, 2]  # one ran alone, the other after it


def test_identical_steps_in_a_graph_run_once(
    store: Store, rootfs: tuple[dict[str, LocalDir], llb.FileOp]
) -> None:
    locals_, base = rootfs
    # Two equal ops (equal digests, distinct objects) reached from two paths.
    twins = [step(base, "count", "echo ran >> /c/runs") for _ in range(2)]
    assert twins[0] is not twins[1] and twins[0].digest == twins[1].digest
    last = step(
        base,
        "report",
        "cat /c/runs > /runs",
        llb.Mount("/one", twins[0], readonly=True),
        llb.Mount("/two", twins[1], readonly=True),
    )
    run, recorder = solver(store, locals_, 4)
    try:
        state = run.solve(last)
    finally:
        run.close()
    assert read(store, state, "runs") == "ran\n"
    assert recorder.of("count") == ["start", "done"]


def test_several_roots_solve_together_sharing_their_common_steps(
    store: Store, rootfs: tuple[dict[str, LocalDir], llb.FileOp]
) -> None:
    locals_, base = rootfs
    # Two platforms' graphs: a shared target-independent step, then one step each that
    # waits for the other's to start (they run at the same time under the limit).
    shared = step(base, "shared", "echo ran >> /c/shared-runs")
    roots = [
        step(
            shared,
            f"{me} step",
            f"touch /c/{me} && {wait_for(f'/c/{other}', 1200)} && ls /c > /seen && cp /c/shared-runs /runs",
        )
        for me, other in (("amd64", "arm64"), ("arm64", "amd64"))
    ]
    run, recorder = solver(store, locals_, 2)
    try:
        states = run.solve_all([*roots, None])
    finally:
        run.close()
    assert states[2] == ()
    for state in states[:2]:
        assert read(store, state, "runs") == "ran\n"
        assert read(store, state, "seen").split() == ["amd64", "arm64", "shared-runs"]
    assert recorder.of("shared") == ["start", "done"]


def test_a_step_starts_after_the_steps_it_reads_have_finished(
    store: Store, rootfs: tuple[dict[str, LocalDir], llb.FileOp]
) -> None:
    locals_, base = rootfs
    first = step(
        base,
        "first",
        "echo first-start >> /c/log; sleep 0.2; echo first-end >> /c/log; touch /made",
    )
    # Reads ``first`` through a bind mount, not as its rootfs.
    second = step(
        base,
        "second",
        "echo second-start >> /c/log; cat /c/log > /log; ls /first > /listing",
        llb.Mount("/first", first, readonly=True),
    )
    run, _ = solver(store, locals_, 4)
    try:
        state = run.solve(second)
    finally:
        run.close()
    assert read(store, state, "log").split() == ["first-start", "first-end", "second-start"]
    assert "made" in read(store, state, "listing").split()


def test_the_first_error_cancels_running_steps_starts_no_more_and_is_raised(
    store: Store, rootfs: tuple[dict[str, LocalDir], llb.FileOp]
) -> None:
    locals_, base = rootfs
    fails = step(base, "fails", f"{wait_for('/c/slow', 1200)}; exit 7")  # once slow runs
    slow = step(base, "slow", "touch /c/slow && sleep 600")
    queued = step(base, "queued", "true")  # may wait for a slot: the limit is 2
    after = step(fails, "after", "true")  # reads what failed
    run, recorder = solver(store, locals_, 2)
    try:
        with pytest.raises(ExecError) as raised:
            run.solve(llb.MergeOp((after, slow, queued)))
    finally:
        run.close()
    assert raised.value.exit_code == 7
    assert recorder.wait_for("error", "slow")  # stopped, not waited for
    events = [(event, name) for event, name, _ in recorder.events]
    (slow_error,) = [
        extra["message"]
        for event, name, extra in recorder.events
        if (event, name) == ("error", "slow")
    ]
    assert "cancelled" in slow_error
    assert recorder.of("fails") == ["start", "error"]
    assert recorder.of("after") == []
    # Nothing starts after the failure (queued ran before it, or never).
    failed_at = events.index(("error", "fails"))
    assert all(event != "start" for event, _ in events[failed_at:])
