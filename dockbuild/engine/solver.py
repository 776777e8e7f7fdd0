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
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dockbuild import llb
from dockbuild.engine import cachekeys, explain
from dockbuild.engine.sources.image import ImageSources
from dockbuild.engine.sources.local import LocalDir
from dockbuild.engine.store import Store, remove_tree
from dockbuild.errors import DockbuildError, ExecError
from dockbuild.progress import Progress

if TYPE_CHECKING:  # the executor and file ops load only when a step really runs
    from dockbuild.engine import fileop, snapshotter
    from dockbuild.engine.executor import Executor
    from dockbuild.engine.network import BuildNetwork

State = tuple[str, ...]  # layer ids, bottom first


class Cancelled(DockbuildError):
    """Another step failed first; this one was not run."""


@dataclass
class SolveOptions:
    no_cache: bool = False
    # Digests of ops to run again whatever the cache holds (--no-cache-filter).
    no_cache_ops: frozenset[str] = frozenset()
    # Say, for every step that missed the cache, which of its inputs changed.
    explain: bool = False
    max_parallel: int = field(default_factory=lambda: os.cpu_count() or 2)
    # RUN mounts and entitlements (--secret, --ssh, --allow); see engine/mounts.py.
    secrets: dict[str, Any] = field(default_factory=dict)
    ssh: dict[str, Any] = field(default_factory=dict)
    allow: frozenset[str] = frozenset()


class _WorkSlots:
    """The semaphore bounding parallel work; a step leaving its slot with an error marks
    the build failed *before* the slot is free, so no waiting step starts after it."""

    def __init__(self, slots: int, failed: threading.Event) -> None:
        self._semaphore = threading.Semaphore(slots)
        self._failed = failed

    def __enter__(self) -> None:
        self._semaphore.acquire()

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is not None and not issubclass(kind, Cancelled):
            self._failed.set()
        self._semaphore.release()


class _RunScratch:
    """RUN scratch directories (an overlay's ``upper`` and ``work``), used again by the
    next RUN instead of removed and made anew.

    Creating and removing directories is the dearest part of a RUN's bookkeeping on a
    file system without a journal: ext4 then skips every recently deleted inode when it
    allocates one, so each removal slows the next minute of creations, the overlay
    mount's own included. A directory comes back only as it was made: an empty
    ``upper`` (made again if the step's layer was renamed away) and the overlay's
    ``work``, whose ``volatile`` marker is removed (the kernel refuses to mount over it,
    and cleans the rest itself). Anything else there (a chroot copy, a RUN mount's
    files) and the directory is removed instead.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._free: list[Path] = []
        self._lock = threading.Lock()

    def take(self) -> Path:
        with self._lock:
            if self._free:
                return self._free.pop()
        work = self._store.tempdir("x")
        (work / "upper").mkdir()
        (work / "work").mkdir()
        return work

    def give(self, work: Path) -> None:
        try:
            names = set(os.listdir(work))
            if names - {"upper", "work"} or "work" not in names:
                raise OSError("not only an overlay's directories")
            if "upper" not in names:
                (work / "upper").mkdir()
            elif os.listdir(work / "upper"):
                raise OSError("a layer left behind")
            volatile = work / "work" / "work" / "incompat" / "volatile"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(volatile / "dirty")
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(volatile)
        except OSError:
            remove_tree(work)
            return
        with self._lock:
            self._free.append(work)


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
        self._executor_starting = False
        self._network: BuildNetwork | None = None  # the build's isolated networks
        self._executor_lock = threading.Lock()
        self._platform_lock = threading.Lock()  # the emulation probe, one at a time
        self.options = options or SolveOptions()
        self.keys = cachekeys.CacheKeys(locals_, store)
        self.keys.secrets = dict(self.options.secrets)
        self._failed = threading.Event()
        self._work = _WorkSlots(self.options.max_parallel, self._failed)
        self._futures: dict[str, concurrent.futures.Future[State]] = {}
        self._futures_lock = threading.Lock()
        self._first_error: BaseException | None = None
        self._reported: set[str] = set()  # digests already shown as CACHED
        # Keys of steps being run again although cached: their new layer gets a fresh id,
        # and the steps that read them are keyed by that id (see _key).
        self._fresh: set[str] = set()
        self._own: dict[str, str] = {}  # key -> the layer the step added, if any
        self._solved_keys: dict[str, str] = {}  # op digest -> the key it was solved under
        self._tainted: set[str] = set()  # ops below a step that runs despite the cache
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=64)
        self._scratch = _RunScratch(store)

    # -- public -------------------------------------------------------------------

    def solve(self, root: llb.Op | None) -> State:
        """Solve ``root``; raise the first error any step hit."""
        return self.solve_all([root])[0]

    def solve_all(self, roots: list[llb.Op | None]) -> list[State]:
        """Solve several roots (one per platform) at once, under the one parallelism
        limit: an op they share (equal digests: a stage that does not depend on the
        target platform) is solved once. Raise the first error any step hit."""
        for root in roots:
            for o in llb.walk(root):
                if any(i is not None and (i.digest in self._tainted or self._ignored(i)) for i in o.inputs()):
                    self._tainted.add(o.digest)
        futures = [self._solve_async(root) if root is not None else None for root in roots]
        return [self._wait(f) if f is not None else () for f in futures]

    def _wait(self, future: concurrent.futures.Future[State]) -> State:
        try:
            while True:
                try:
                    return future.result(timeout=0.05)
                except TimeoutError:
                    # A failure anywhere ends the build now: steps still running are
                    # stopped by close(), steps not started never start.
                    if self._first_error is not None:
                        raise self._first_error from None
        except (Cancelled, concurrent.futures.CancelledError) as e:
            # The step that failed first is the error to report, not a cancelled one;
            # its thread may still be on its way to recording it.
            for _ in range(100):
                if self._first_error is not None:
                    raise self._first_error from None
                time.sleep(0.05)
            raise Cancelled("build cancelled") from e

    def added_layer(self, op: llb.Op) -> bool:
        """Whether a solved step added a layer (a step that changed nothing adds none)."""
        key = self._solved_keys.get(op.digest) or self.keys.key(op)
        if key in self._own:
            return True
        record = self.store.record(key)
        if record is None:  # pruned while the steps on top of it stayed: its layer tells
            return self.store.has_layer(cachekeys.layer_id(key))
        if not record.layers:
            return False
        if record.owns:
            return record.layers[-1] in record.owns
        return record.layers[-1] == cachekeys.layer_id(key)  # a record without owns

    def solved_keys(self) -> list[str]:
        """The cache keys of the steps this build looked up or ran (their records)."""
        return list(dict.fromkeys(self._solved_keys.values()))

    def layer_made(self, op: llb.Op) -> float | None:
        """When the layer a solved step added was made (its row in the cache), so a rebuild
        from the cache gives the same history times; None when the step added no layer."""
        if not self.added_layer(op):
            return None
        key = self._solved_keys.get(op.digest) or self.keys.key(op)
        layer = self._own.get(key)
        if layer is None:
            record = self.store.record(key)
            layer = record.layers[-1] if record is not None and record.layers else cachekeys.layer_id(key)
        return self.store.layer_created(layer)

    def layer_paths(self, state: State) -> tuple[Path, ...]:
        """The state's layer directories, for a step that reads them: packed layers (a
        cache import's, a base image's) are unpacked now."""
        return self.store.unpacked_paths(state)

    def runs_done(self) -> None:
        """No step of this build will run any more: its networks are released while the
        build exports; close() waits for that."""
        with self._executor_lock:
            if self._network is not None:
                self._network.finish()

    def close(self) -> None:
        self._failed.set()
        try:
            with self._executor_lock:
                if self._executor is not None:
                    self._executor.close()
                if self._network is not None:  # opened, or being opened, with no executor yet
                    self._network.close()
        finally:
            # Steps not started never start; a running one (an unpack, a file op) ends
            # before the store removes its temp folder under it. The interpreter would
            # wait for it at exit all the same.
            self._pool.shutdown(wait=True, cancel_futures=True)

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
        # The first input to fail fails this step at once, not after its siblings finish.
        concurrent.futures.wait([f for f in futures if f is not None], return_when="FIRST_EXCEPTION")
        states = [f.result() if f is not None else () for f in futures]
        if self._failed.is_set():
            raise Cancelled("cancelled after an earlier failure")
        return states

    def _solve_one(self, op: llb.Op) -> State:
        if self._failed.is_set():
            raise Cancelled("cancelled after an earlier failure")
        try:
            return self._dispatch(op)
        except DockbuildError as e:
            if e.location is None and not isinstance(e, Cancelled):
                e.location = getattr(op, "location", None)  # the step's Dockerfile lines
            self._fail(e)
            raise
        except BaseException as e:
            self._fail(e)
            raise

    def _fail(self, error: BaseException) -> None:
        with self._futures_lock:
            if self._first_error is None and not isinstance(error, Cancelled):
                self._first_error = error
        self._failed.set()

    def _dispatch(self, op: llb.Op) -> State:
        if isinstance(op, llb.SourceOp):
            if op.identifier.startswith("local://"):
                return ()  # read in place through a LocalView, never copied into layers
            if cachekeys.is_remote(op):
                return self._solve_remote(op)
            state = self.images.materialize(op, self.progress, self._work)
            self._record_image(op, state)
            return state
        name = getattr(op, "name", "") or type(op).__name__
        ignore = self._ignored(op)
        key = self._key(op)
        if not ignore and (hit := self.store.get_record(key)) is not None:
            self._report_cached(op)
            return tuple(hit)
        if isinstance(op, llb.ExecOp):
            if op.platform:
                self._require_platform(op.platform)
            self._start_executor(op.network)
        with self.store.lock(key):
            # Another process may have solved the same step while we waited for the lock.
            if not ignore and (hit := self.store.get_record(key)) is not None:
                self._report_cached(op)
                return tuple(hit)
            inputs = explain.fingerprint(op, self.keys, self._key_or_none)
            why = self._explain(name, inputs, ignore) if self.options.explain else None
            if ignore:
                self._fresh.add(key)
            try:
                state = self._run(op, key, name)
            finally:
                if why:  # said once the inputs were solved: the explanations read top-down
                    self.progress.message(why)
            own = self._own.get(key)
            self.store.put_record(
                key, list(state), name, owns=[own] if own else [], inputs=inputs
            )
            if op.digest in self._tainted:
                # Later builds without the filter read this step under its plain key: let
                # them find the re-run's result, not the one made before it.
                self.store.put_record(
                    self.keys.key(op), list(state), name, owns=[own] if own else [], inputs=inputs
                )
            return state

    def _ignored(self, op: llb.Op) -> bool:
        return (
            self.options.no_cache
            or op.digest in self.options.no_cache_ops
            or bool(getattr(op, "ignore_cache", False))
        )

    def _key(self, op: llb.Op) -> str:
        """The op's cache key. Below a step that runs again despite the cache, the key
        also holds the layer ids its inputs solved to: a re-run's output is new, so what
        reads it must not reuse results made from the old one."""
        key = self.keys.key(op)
        if op.digest in self._tainted:
            states = self._inputs(op.inputs())
            key = cachekeys.combine(key, *(",".join(s) for s in states))
        self._solved_keys[op.digest] = key
        return key

    def solved_key(self, op: llb.Op) -> str:
        """The key ``op`` was solved (or would be looked up) under."""
        return self._key_or_none(op)

    def _key_or_none(self, op: llb.Op | None) -> str:
        if op is None:
            return "scratch"
        return self._solved_keys.get(op.digest) or self.keys.key(op)

    def _record_image(self, op: llb.SourceOp, state: State) -> None:
        """A record for a base image, so du, prune and GC see its layers."""
        manifest_digest = op.identifier.rpartition("@")[2]
        refs = [manifest_digest]
        try:
            manifest = json.loads(self.store.blob_path(manifest_digest).read_bytes())
            refs.append(manifest["config"]["digest"])
        except (OSError, ValueError, KeyError):
            pass
        self.store.put_record(
            self.keys.key(op),
            list(state),
            getattr(op, "name", "") or op.identifier,
            owns=list(state),
            refs=refs,
            inputs={"op": {"identifier": op.identifier}, "parents": [], "files": []},
        )

    def _explain(self, name: str, inputs: dict[str, Any], ignore: bool) -> str:
        if ignore:
            reasons = ["the cache is ignored for this step (--no-cache or --no-cache-filter)"]
        else:
            reasons = explain.reasons(inputs, explain.previous(self.store, name))
        return f"explain-cache: {name}: " + "; ".join(reasons)

    def _solve_remote(self, op: llb.SourceOp) -> State:
        """An HTTP or git source: fetched into a layer of its own, once per content."""
        key = self.keys.key(op)
        if not self.options.no_cache and (hit := self.store.get_record(key)) is not None:
            self._report_cached(op)
            return tuple(hit)
        with self.store.lock(key):
            if not self.options.no_cache and (hit := self.store.get_record(key)) is not None:
                self._report_cached(op)
                return tuple(hit)
            with self._work:
                if self._failed.is_set():  # waited for a slot while another step failed
                    raise Cancelled("cancelled after an earlier failure")
                vertex = self.progress.vertex(op.name or op.identifier)
                work = self.store.tempdir("s")
                try:
                    layer = work / "layer"
                    layer.mkdir()
                    try:
                        if op.identifier.startswith("git://"):
                            from dockbuild.engine.sources import git

                            git.materialize(op, layer)
                        else:
                            from dockbuild.engine.sources import http

                            http.materialize(op, self.store, layer, self.options.secrets)
                    except DockbuildError as e:
                        vertex.error(e.message)
                        raise
                    state = self._commit((), layer, key)
                    self.store.put_record(
                        key,
                        list(state),
                        op.name or op.identifier,
                        type="source.git.checkout" if op.identifier.startswith("git://") else "regular",
                        owns=list(state),
                    )
                finally:
                    remove_tree(work)
                vertex.done()
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

    def _require_platform(self, platform: str) -> None:
        """A RUN step of a foreign ``platform`` will run: this machine must run its binaries
        (binfmt_misc/QEMU), or the step fails before it starts, naming what is missing.
        A cached step needs no emulator, as in BuildKit."""
        from dockbuild.engine.executor.emulation import require_runnable

        # The answer is kept (emulation.support_of); steps of one platform that start
        # together wait for the first one's probe instead of each probing.
        with self._platform_lock:
            require_runnable(platform)

    def _start_executor(self, network: str) -> None:
        """A RUN step will run: probe and start the executor beside the rest of the work
        (its inputs, the steps before it), not when the step gets there; for a step of
        the isolated ``network``, open the build's networks beside that too."""
        with self._executor_lock:
            if network == "default":
                self._build_network().prepare()
            if self._executor is not None or self._executor_starting:
                return
            self._executor_starting = True

        def warm_up() -> None:
            # Whatever fails here fails again, and is reported, where the step runs.
            with contextlib.suppress(Exception):
                self._executor_instance().start()

        with contextlib.suppress(RuntimeError):  # the solver is closing
            self._pool.submit(warm_up)

    def _executor_instance(self) -> Executor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = self._executor_factory()
                if self._executor.warning:
                    self.progress.message(f"WARNING: {self._executor.warning}")
                self._executor.network = self._build_network()
            return self._executor

    def _build_network(self) -> BuildNetwork:
        """The build's networks, made on first use (the caller holds the executor lock):
        the executor gets them, whichever of the two comes first."""
        if self._network is None:
            from dockbuild.engine.network import BuildNetwork

            self._network = BuildNetwork()
        return self._network

    def _run_exec(self, op: llb.ExecOp, key: str, name: str) -> State:
        from dockbuild.engine import mounts
        from dockbuild.engine.executor import RunRequest

        mounts.check_op(op, self.options.allow)
        # The rootfs and every mount that reads a state (bind, cache from=), in parallel.
        reads = [i for i, m in enumerate(op.mounts) if i == 0 or m.input is not None]
        solved = self._inputs(tuple(op.mounts[i].input for i in reads))
        states = dict(zip(reads, solved, strict=True))
        parent = states[0]
        with self._work:
            if self._failed.is_set():  # waited for a slot while another step failed
                raise Cancelled("cancelled after an earlier failure")
            vertex = self.progress.vertex(name)
            work = self._scratch.take()
            step_root: snapshotter.StepRoot | None = None
            try:
                upper = work / "upper"
                with contextlib.ExitStack() as stack:
                    try:
                        specs, extra_env = self._run_mounts().prepare(op, states, work, stack)
                        executor = self._executor_instance()
                        step_root = self._snapshotter(executor).prepare(
                            self.layer_paths(parent), work
                        )
                        request = RunRequest(
                            args=op.args,
                            env=op.env + op.proxy_env + tuple(extra_env),
                            cwd=op.cwd,
                            rootfs=step_root.rootfs,
                            user=op.user,
                            mounts=tuple(specs),
                            network=op.network,
                            hostname=op.hostname,
                            extra_hosts=op.extra_hosts,
                            shm_size=op.shm_size,
                            security=op.security,
                        )
                        status = executor.run(request, vertex.log)
                        if status == 0:
                            step_root.commit()
                    except DockbuildError as e:
                        vertex.error(e.message)
                        raise
                if status != 0:
                    err = ExecError(_shell_words(op.args), status, list(vertex.tail))
                    vertex.error(err.message)
                    raise err
                state = self._commit(parent, upper, key)
                step_root.release(self.layer_paths(state))
            except BaseException:
                if step_root is not None:
                    step_root.release(None)
                remove_tree(work)
                raise
            # Made ready for the next RUN beside it (Store.close removes what is left).
            try:
                self._pool.submit(self._scratch.give, work)
            except RuntimeError:  # the solver is closing
                remove_tree(work)
            vertex.done()
            return state

    def _snapshotter(self, executor: Executor) -> snapshotter.Snapshotter:
        """One per build: the copy snapshotter keeps working rootfs dirs between steps."""
        from dockbuild.engine import snapshotter

        with self._executor_lock:
            chosen = self.__dict__.get("_snapshotter_instance")
            if chosen is None:
                chosen = snapshotter.for_executor(executor, self.store.root)
                self.__dict__["_snapshotter_instance"] = chosen
            return chosen

    def _run_mounts(self) -> Any:
        """The host side of RUN mounts (engine/mounts.py), made on first use."""
        import weakref

        from dockbuild.engine import mounts

        with self._executor_lock:
            run_mounts = self.__dict__.get("_mounts")
            if run_mounts is None:
                ssh = mounts.SSHForwarding(dict(self.options.ssh))
                weakref.finalize(self, ssh.close)  # agents and proxies end with the build
                run_mounts = mounts.RunMounts(
                    cache=mounts.CacheMounts(self.store.root),
                    secrets=dict(self.options.secrets),
                    ssh=ssh,
                    locals=self.locals,
                    layer_paths=self.layer_paths,
                    input_key=self.keys.key,
                    cancelled=self._failed.is_set,
                )
                self.__dict__["_mounts"] = run_mounts
            return run_mounts

    def _run_file(self, op: llb.FileOp, key: str, name: str) -> State:
        from dockbuild.engine import fileop

        base, *sources = self._inputs(op.inputs())
        with self._work:
            if self._failed.is_set():  # waited for a slot while another step failed
                raise Cancelled("cancelled after an earlier failure")
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
                    # --no-cache: nothing from earlier builds, not even their files
                    reuse = () if self._ignored(op) else self._earlier_layers(name)
                    fileop.apply(op.actions, self.layer_paths(base), upper, views, reuse)
                except DockbuildError as e:
                    vertex.error(e.message)
                    raise
                state = self._commit(base, upper, key)
            finally:
                remove_tree(work)
            vertex.done()
            return state

    def _earlier_layers(self, name: str) -> tuple[Path, ...]:
        """The layer the last run of the step named ``name`` added, if still unpacked: a
        COPY from the context hardlinks its unchanged files from it (fileop.apply)."""
        record = explain.previous(self.store, name) if name else None
        if record is None or not record.owns:
            return ()
        path = self.store.layer_path(record.owns[-1])
        return (path,) if path.is_dir() else ()

    def _copy_source(self, source: llb.Op | None, state: State) -> fileop.SourceView:
        from dockbuild.engine import fileop

        if isinstance(source, llb.SourceOp) and source.identifier.startswith("local://"):
            return fileop.LocalView(self.locals[source.identifier[len("local://") :]])
        return fileop.LayersView(self.layer_paths(state))

    def _commit(self, parent: State, upper: Path, key: str) -> State:
        """The parent chain, plus ``upper`` as a new layer unless the step changed nothing."""
        if not any(upper.iterdir()):
            return parent
        if key in self._fresh:  # a re-run despite the cache: never reuse the old layer
            layer_id = cachekeys.layer_id(cachekeys.combine(key, os.urandom(16).hex()))
        else:
            layer_id = cachekeys.layer_id(key)
        self.store.commit_layer(layer_id, upper)
        self._own[key] = layer_id
        return (*parent, layer_id)


def _shell_words(args: tuple[str, ...]) -> str:
    return " ".join(args)
