"""The solver: walks an LLB graph, looks each op up in the cache, runs what missed.

A solved state is a chain of layer ids (bottom first). Cache keys are computed first,
for the whole graph, from op digests and the content of what ops read (cachekeys.py);
an op whose key has a record is CACHED and its inputs are never materialised. Missing
ops run once their inputs are solved; independent inputs are solved in parallel (a
thread per waiting vertex, a semaphore bounding the real work). The first failure
cancels everything not yet started, and is the error the build reports.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dockbuild import llb
from dockbuild.engine import cachekeys
from dockbuild.engine.sources.image import ImageSources
from dockbuild.engine.sources.local import LocalDir
from dockbuild.engine.store import Store, remove_tree
from dockbuild.errors import DockbuildError, ExecError
from dockbuild.progress import Progress

if TYPE_CHECKING:  # the executor and file ops load only when a step really runs
    from dockbuild.engine import fileop
    from dockbuild.engine.executor import Executor

State = tuple[str, ...]  # layer ids, bottom first


class Cancelled(DockbuildError):
    """Another step failed first; this one was not run."""


@dataclass
class SolveOptions:
    no_cache: bool = False
    max_parallel: int = field(default_factory=lambda: os.cpu_count() or 2)


class Solver:
    def __init__(
        self,
        store: Store,
        progress: Progress,
        locals_: dict[str, LocalDir],
        images: ImageSources,
        executor: Callable[[], Executor],
        options: SolveOptions | None = None,
    ) -> None:
        self.store = store
        self.progress = progress
        self.locals = locals_
        self.images = images
        self._executor_factory = executor
        self._executor: Executor | None = None
        self._executor_lock = threading.Lock()
        self.options = options or SolveOptions()
        self.keys = cachekeys.CacheKeys(locals_)
        self._work = threading.Semaphore(self.options.max_parallel)
        self._futures: dict[str, concurrent.futures.Future[State]] = {}
        self._futures_lock = threading.Lock()
        self._failed = threading.Event()
        self._reported: set[str] = set()  # digests already shown as CACHED
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=64)

    # -- public -------------------------------------------------------------------

    def solve(self, root: llb.Op | None) -> State:
        """Solve ``root``; raise the first error any step hit."""
        if root is None:
            return ()
        try:
            return self._solve_async(root).result()
        except concurrent.futures.CancelledError as e:
            raise Cancelled("build cancelled") from e

    def added_layer(self, op: llb.Op) -> bool:
        """Whether a solved step added a layer (a step that changed nothing adds none)."""
        key = self.keys.key(op)
        layers = self.store.get_record(key)
        return bool(layers) and layers[-1] == cachekeys.layer_id(key)

    def layer_paths(self, state: State) -> tuple[Path, ...]:
        return tuple(self.store.layer_path(lid) for lid in state)

    def close(self) -> None:
        self._failed.set()
        with self._executor_lock:
            if self._executor is not None:
                self._executor.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- scheduling -------------------------------------------------------------------

    def _solve_async(self, op: llb.Op) -> concurrent.futures.Future[State]:
        with self._futures_lock:
            fut = self._futures.get(op.digest)
            if fut is None:
                fut = self._pool.submit(self._solve_one, op)
                self._futures[op.digest] = fut
            return fut

    def _inputs(self, ops: tuple[llb.Op | None, ...]) -> list[State]:
        futures = [self._solve_async(op) if op is not None else None for op in ops]
        return [f.result() if f is not None else () for f in futures]

    def _solve_one(self, op: llb.Op) -> State:
        if self._failed.is_set():
            raise Cancelled("cancelled after an earlier failure")
        try:
            return self._dispatch(op)
        except BaseException:
            self._failed.set()
            raise

    def _dispatch(self, op: llb.Op) -> State:
        if isinstance(op, llb.SourceOp):
            if op.identifier.startswith("local://"):
                return ()  # read in place through a LocalView, never copied into layers
            return self.images.materialize(op, self.progress, self._work)
        key = self.keys.key(op)
        name = getattr(op, "name", "") or type(op).__name__
        ignore = self.options.no_cache or getattr(op, "ignore_cache", False)
        if not ignore and (hit := self.store.get_record(key)) is not None:
            self._report_cached(op)
            return tuple(hit)
        with self.store.lock(key):
            # Another process may have solved the same step while we waited for the lock.
            if not ignore and (hit := self.store.get_record(key)) is not None:
                self._report_cached(op)
                return tuple(hit)
            state = self._run(op, key, name)
            self.store.put_record(key, list(state), name)
            return state

    def _report_cached(self, op: llb.Op) -> None:
        """Show a cache hit and the steps behind it as CACHED, as BuildKit does, though
        nothing behind a hit is materialised."""
        with self._futures_lock:
            todo = [o for o in llb.walk(op) if o.digest not in self._reported]
            self._reported.update(o.digest for o in todo)
        for o in todo:
            if isinstance(o, llb.SourceOp) and o.identifier.startswith("local://"):
                continue
            self.progress.vertex(getattr(o, "name", "") or type(o).__name__).cached()

    def _run(self, op: llb.Op, key: str, name: str) -> State:
        if isinstance(op, llb.ExecOp):
            return self._run_exec(op, key, name)
        if isinstance(op, llb.FileOp):
            return self._run_file(op, key, name)
        if isinstance(op, llb.MergeOp):
            inputs = self._inputs(op.states)
            return tuple(lid for state in inputs for lid in state)
        raise DockbuildError(f"unsupported op {type(op).__name__}")

    # -- ops -----------------------------------------------------------------------

    def _executor_instance(self) -> Executor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = self._executor_factory()
            return self._executor

    def _run_exec(self, op: llb.ExecOp, key: str, name: str) -> State:
        from dockbuild.engine.executor import OverlayRootfs, RunRequest

        if len(op.mounts) > 1:
            kinds = ", ".join(sorted({m.type for m in op.mounts[1:]}))
            raise DockbuildError(f"RUN --mount ({kinds}) is not supported yet")
        (parent,) = self._inputs((op.rootfs,))
        with self._work:
            vertex = self.progress.vertex(name)
            work = self.store.tempdir("x")
            try:
                upper, overlay_work = work / "upper", work / "work"
                upper.mkdir()
                overlay_work.mkdir()
                lowers = [str(p) for p in reversed(self.layer_paths(parent))]
                if not lowers:  # overlayfs needs at least one lower dir: FROM scratch
                    (work / "empty").mkdir()
                    lowers = [str(work / "empty")]
                request = RunRequest(
                    args=op.args,
                    env=op.env + op.proxy_env,
                    cwd=op.cwd,
                    rootfs=OverlayRootfs(tuple(lowers), str(upper), str(overlay_work)),
                    user=op.user,
                    network=op.network,
                    hostname=op.hostname,
                )
                try:
                    status = self._executor_instance().run(request, vertex.log)
                except DockbuildError as e:
                    vertex.error(e.message)
                    raise
                if status != 0:
                    err = ExecError(_shell_words(op.args), status, list(vertex.tail))
                    vertex.error(err.message)
                    raise err
                state = self._commit(parent, upper, key)
            finally:
                remove_tree(work)
            vertex.done()
            return state

    def _run_file(self, op: llb.FileOp, key: str, name: str) -> State:
        from dockbuild.engine import fileop

        base, *sources = self._inputs(op.inputs())
        with self._work:
            vertex = self.progress.vertex(name)
            work = self.store.tempdir("f")
            try:
                upper = work / "upper"
                upper.mkdir()
                source_views = iter(sources)
                views = []
                for action in op.actions:
                    if isinstance(action, llb.Copy):
                        views.append(self._copy_source(action.source, next(source_views)))
                try:
                    fileop.apply(op.actions, self.layer_paths(base), upper, views)
                except DockbuildError as e:
                    vertex.error(e.message)
                    raise
                state = self._commit(base, upper, key)
            finally:
                remove_tree(work)
            vertex.done()
            return state

    def _copy_source(self, source: llb.Op | None, state: State) -> fileop.SourceView:
        from dockbuild.engine import fileop

        if isinstance(source, llb.SourceOp) and source.identifier.startswith("local://"):
            return fileop.LocalView(self.locals[source.identifier[len("local://") :]])
        return fileop.LayersView(self.layer_paths(state))

    def _commit(self, parent: State, upper: Path, key: str) -> State:
        """The parent chain, plus ``upper`` as a new layer unless the step changed nothing."""
        if not any(upper.iterdir()):
            return parent
        layer_id = cachekeys.layer_id(key)
        self.store.commit_layer(layer_id, upper)
        return (*parent, layer_id)


def _shell_words(args: tuple[str, ...]) -> str:
    return " ".join(args)
