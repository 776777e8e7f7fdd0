"""One build, start to end: request -> frontend -> engine.solve -> outputs.export.

This module wires the rooms together and owns nothing else: reading the Dockerfile and
.dockerignore, naming the contexts, choosing the outputs. It is the only place that
knows both the frontend and the engine.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockbuild.errors import DockbuildError


@dataclass
class BuildRequest:
    context: str
    dockerfile: str | None = None
    tags: list[str] = field(default_factory=list)
    target: str | None = None
    build_args: dict[str, str | None] = field(default_factory=dict)
    build_contexts: dict[str, str] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    progress: str = "auto"
    quiet: bool = False
    no_cache: bool = False
    pull: bool = False
    no_cache_filter: list[str] = field(default_factory=list)  # stage names
    explain_cache: bool = False
    cache_from: list[str] = field(default_factory=list)  # --cache-from specs
    cache_to: list[str] = field(default_factory=list)  # --cache-to specs
    platform: str | None = None
    executor: str | None = None
    network: str = "default"
    secrets: list[str] = field(default_factory=list)  # --secret values
    ssh: list[str] = field(default_factory=list)  # --ssh values
    allow: list[str] = field(default_factory=list)  # --allow entitlements
    iidfile: str | None = None
    metadata_file: str | None = None
    check: bool = False  # --check: run the build checks only
    push: bool = False
    load: bool = False
    squash: bool = False


@dataclass
class _Inputs:
    """What a request names on this host: the Dockerfile, the contexts."""

    dockerfile_name: str
    dockerfile_text: bytes
    ignore_patterns: tuple[str, ...]
    local_dirs: dict[str, Path]  # context name -> directory
    layouts: dict[str, tuple[Path, str | None, str | None]]  # name -> (path, tag, digest)
    images: dict[str, str]  # name -> registry reference


HOST_PLATFORM = "linux/amd64"


def _inputs(request: BuildRequest) -> _Inputs:
    from dockbuild.engine.sources import context as remote_context
    from dockbuild.frontend.dockerignore import parse_dockerignore

    keep_git = request.build_args.get("BUILDKIT_CONTEXT_KEEP_GIT_DIR") in ("1", "true")
    remote = remote_context.is_remote(request.context)
    # A tar on stdin (`-`), a git URL or an HTTP tarball becomes a temporary directory.
    ctx = remote_context.load_context(request.context, keep_git, epoch=_commit_times(request)) if remote else Path(request.context)
    if not ctx.is_dir():
        raise DockbuildError(f"unable to prepare context: path {request.context!r} not found")
    if request.dockerfile and remote and not Path(request.dockerfile).is_absolute():
        df = ctx / request.dockerfile  # -f names a file inside a remote context
    elif request.dockerfile:
        df = Path(request.dockerfile)
    else:
        df = ctx / "Dockerfile"
        if not df.exists() and (ctx / "dockerfile").exists():
            df = ctx / "dockerfile"
    try:
        text = _read_dockerfile(request, df)
        if request.dockerfile == "-":
            df = Path("-")  # no Dockerfile.dockerignore for stdin: the context's applies
    except OSError as e:
        raise DockbuildError(
            f"failed to read dockerfile: open {df}: {e.strerror.lower()}"
        ) from e
    # <Dockerfile>.dockerignore beside the Dockerfile wins over the context's .dockerignore.
    ignore_file = Path(str(df) + ".dockerignore")
    if not ignore_file.exists():
        ignore_file = ctx / ".dockerignore"
    patterns = (
        parse_dockerignore(ignore_file.read_bytes()) if ignore_file.exists() else ()
    )
    locals_: dict[str, Path] = {"context": ctx}
    layouts: dict[str, tuple[Path, str | None, str | None]] = {}
    images: dict[str, str] = {}
    for name, value in request.build_contexts.items():
        if value.startswith("oci-layout://"):
            path, tag, digest = _split_layout(value[len("oci-layout://") :])
            layouts[name] = (Path(path), tag, digest)
        elif value.startswith("docker-image://"):
            images[name] = value[len("docker-image://") :]
        elif remote_context.is_remote(value) and value != "-":
            locals_[name] = remote_context.load_context(value, keep_git, epoch=_commit_times(request))  # git URL, HTTP tar
        elif "://" in value:
            raise DockbuildError(f"build context {name}={value}: this kind of context is not supported yet")
        else:
            if not Path(value).is_dir():
                raise DockbuildError(f"build context {name}={value}: not a directory")
            locals_[name] = Path(value)
    name = STDIN_DOCKERFILE_NAME if request.dockerfile == "-" else str(df)
    return _Inputs(name, text, tuple(patterns), locals_, layouts, images)


def _local_dirs(inputs: _Inputs, digests: Any) -> dict[str, Any]:
    """The local contexts, keyed by name; a Dockerfile that copies the whole build
    context (``COPY . /app``) starts hashing it now, in a child process, while this one
    loads the rest of dockbuild and converts the Dockerfile (forked while this process
    has no other thread)."""
    from dockbuild.engine.sources.local import LocalDir

    locals_ = {
        name: LocalDir(path, inputs.ignore_patterns if name == "context" else _own_ignore(path), digests)
        for name, path in inputs.local_dirs.items()
    }
    if _WHOLE_CONTEXT.search(inputs.dockerfile_text):
        locals_["context"].prefetch()
    return locals_


def _early_digests(db: Path) -> Any:
    """The context digests of a cache database that exists and opens, before the store
    loads; None otherwise (the store then makes the database, or says why it cannot)."""
    import sqlite3

    from dockbuild.engine.sources.local import FileDigests

    if not db.exists():
        return None
    try:
        return FileDigests(db)
    except sqlite3.Error:
        return None


def _commit_times(request: BuildRequest) -> bool:
    """Whether git contexts get their files' commit times (SOURCE_DATE_EPOCH is set)."""
    from dockbuild.outputs.export import source_date_epoch

    return source_date_epoch(request.build_args) is not None


def _split_layout(text: str) -> tuple[str, str | None, str | None]:
    """``PATH[:TAG]`` or ``PATH@sha256:...`` as buildx spells an oci-layout context."""
    if "@" in text:
        path, _, digest = text.rpartition("@")
        return path, None, digest
    head, sep, tail = text.rpartition(":")
    if sep and "/" not in tail and head:
        return head, tail, None
    return text, None, None


def _context_key(name: str, inputs: _Inputs) -> str:
    """The named context a FROM / --from name means: as BuildKit's dockerui NamedContext,
    the familiar form without ``:latest`` (``busybox:latest`` and
    ``docker.io/library/busybox`` are the context ``busybox``)."""
    known = (*inputs.local_dirs, *inputs.layouts, *inputs.images)
    if name in known:
        return name
    from dockbuild.engine.registry.reference import parse_reference

    try:
        short = parse_reference(name).familiar.removesuffix(":latest")
    except DockbuildError:
        return name
    return short if short in known else name


def _frontend_definition(request: BuildRequest, inputs: _Inputs, sources: Any) -> Any:
    from dockbuild.engine.sources.local import ignore_rules, is_ignored
    from dockbuild.frontend import convert

    def resolve(name: str) -> convert.NamedSource | None:
        """A FROM / --from name: a named context, else (for FROM) a registry image."""
        name = _context_key(name, inputs)
        if name in inputs.local_dirs and name != "context":
            return convert.NamedSource("local", f"local://{name}", None, name)
        if name in inputs.layouts:
            _, tag, digest = inputs.layouts[name]
            info = sources.resolve_layout(name, tag, digest)
            return convert.NamedSource("image", info.identifier, info.config, info.name)
        if name in inputs.images:
            info = sources.resolve_registry(inputs.images[name])
            return convert.NamedSource("image", info.identifier, info.config, info.name)
        return None

    def resolve_image(ref: str) -> convert.NamedSource:
        info = sources.resolve_registry(ref)
        return convert.NamedSource("image", info.identifier, info.config, info.name)

    build_args = {}
    for key, value in request.build_args.items():
        if value is None:  # `--build-arg NAME` takes the value from the environment
            if key not in os.environ:
                continue
            value = os.environ[key]
        build_args[key] = value
    options = convert.ConvertOptions(
        target=request.target,
        build_args=build_args,
        labels=request.labels,
        platform=request.platform or HOST_PLATFORM,
        network=request.network,
        exclude_patterns=inputs.ignore_patterns,
        dockerfile_name=inputs.dockerfile_name,
        all_stages=request.check and request.target is None,
        is_ignored=functools.partial(is_ignored, ignore_rules(inputs.ignore_patterns)),
    )
    return convert.dockerfile_to_llb(
        inputs.dockerfile_text, options, resolve_named=resolve, resolve_image=resolve_image
    )


def definition(request: BuildRequest) -> dict[str, Any]:
    """The LLB graph and image config a request means (``dockbuild debug llb``)."""
    from dockbuild import llb
    from dockbuild.engine.sources.image import ImageSources
    from dockbuild.engine.store import Store

    inputs = _inputs(request)
    store = Store()
    try:
        sources = ImageSources(
            store, {k: v[0] for k, v in inputs.layouts.items()}, pull=request.pull
        )
        result = _frontend_definition(request, inputs, sources)
        return {"llb": llb.to_json(result.root), "config": result.image_config}
    finally:
        store.close()


def build(request: BuildRequest) -> None:
    from dockbuild.engine.cacheroot import default_root
    from dockbuild.engine.sources.local import FileDigests

    platform = request.platform or HOST_PLATFORM
    if platform != HOST_PLATFORM:
        raise DockbuildError(f"platform {platform} is not supported yet", hint=f"use {HOST_PLATFORM}")
    store = None
    progress = None
    solver = None
    digests = None
    locals_: dict[str, Any] = {}
    try:
        inputs = _inputs(request)
        # Context file digests persist in the cache db: an unchanged context is a stat
        # walk. With a db to read already, that walk starts before the store loads.
        root = default_root().absolute()
        digests = _early_digests(root / "db.sqlite")
        if digests is not None:
            locals_ = _local_dirs(inputs, digests)
        from dockbuild.engine.store import Store

        store = Store(root)  # a cache it cannot open is an error before any progress shows
        if digests is None:
            digests = FileDigests(root / "db.sqlite")
            locals_ = _local_dirs(inputs, digests)
        from dockbuild.engine.solver import SolveOptions, Solver
        from dockbuild.engine.sources.image import ImageSources
        from dockbuild.outputs import export
        from dockbuild.progress import make_progress

        outputs = export.parse_outputs(
            request.outputs,
            tags=request.tags,
            stdout_is_tty=sys.stdout.isatty(),
            push=request.push,
            load=request.load,
        )
        epoch = export.source_date_epoch(request.build_args)
        cache_from: list[Any] = []
        cache_to: list[Any] = []
        if request.cache_from or request.cache_to:  # every use of cacheio is under these
            from dockbuild.engine import cacheio

            cache_from = [cacheio.parse_cache_spec(t, export=False) for t in request.cache_from]
            cache_to = [cacheio.parse_cache_spec(t, export=True) for t in request.cache_to]
        progress = make_progress(request.progress)
        vertex = progress.vertex(f"[internal] load build definition from {request.dockerfile or 'Dockerfile'}")
        vertex.log("stdout", f"transferring dockerfile: {len(inputs.dockerfile_text)}B done\n".encode())
        vertex.done()
        sources = ImageSources(
            store, {k: v[0] for k, v in inputs.layouts.items()}, pull=request.pull
        )
        run_options = _run_options(request)
        # The cache manifests arrive while the frontend resolves base images.
        cache_sources = cacheio.open_sources(cache_from, sources.client, progress) if cache_from else None
        result = _frontend_definition(request, inputs, sources)
        from dockbuild.engine.mounts import check_entitlements

        check_entitlements(result.root, run_options["allow"])
        for warning in result.warnings:
            progress.message(warning)
        solver = Solver(
            store,
            progress,
            locals_,
            sources,
            lambda: _executor(request.executor),
            SolveOptions(
                no_cache=request.no_cache,
                no_cache_ops=_no_cache_ops(request, result, progress),
                explain=request.explain_cache,
                max_parallel=_max_parallelism(),
                **run_options,
            ),
        )
        if cache_sources is not None:
            cacheio.import_cache(store, solver, result.root, cache_sources(), progress)
        state = solver.solve(result.root)
        config = export.finish_config(result.image_config, result.history_ops, solver)
        if any(spec.type == "inline" for spec in cache_to):
            if request.squash:
                progress.message("WARNING: --cache-to type=inline is ignored with --squash")
            else:
                config = cacheio.with_inline_cache(
                    config, cacheio.inline_metadata(store, solver, result.root, state)
                )
        image = export.Image(
            state=state,
            config=config,
            layer_paths=tuple(store.layer_path(lid) for lid in state),  # may be packed: see export
            base_layers=export.base_layer_count(config, result.history_ops, len(state)),
            epoch=epoch,
            squash=request.squash,
            sources=export.registry_sources(result.root),
        )
        ids = export.export_all(store, image, outputs, progress)
        if request.iidfile and ids.image_id:
            export.write_atomic(Path(request.iidfile), ids.image_id.encode())
        if request.metadata_file:
            export.write_metadata(Path(request.metadata_file), ids)
        if cache_to:
            cacheio.export_cache(store, solver, result.root, cache_to, progress)
        if store.grew:  # a build that added nothing cannot push the cache over a limit
            _collect_garbage(store, progress)
        if not outputs:
            progress.message(
                "Build result kept in the cache (no output requested). "
                "Export it with -o type=docker|oci|local|tar[,dest=PATH], "
                "or pipe stdout: dockbuild ... | docker load"
            )
    except BaseException as e:
        if isinstance(e, DockbuildError):
            _attach_snippet(e)
        raise
    finally:
        if solver is not None:
            solver.close()
        for local in locals_.values():
            local.stop()
        if digests is not None:
            digests.close()
        if progress is not None:
            progress.close()
        if store is not None:
            store.close()
    if request.quiet and ids.image_id:
        print(ids.image_id)


# A COPY or ADD of the whole context (``COPY . /app``, flags allowed, not --from).
_WHOLE_CONTEXT = re.compile(rb"(?im)^[ \t]*(?:copy|add)[ \t]+(?:--(?!from)\S+[ \t]+)*\./?[ \t]")


def _collect_garbage(store: Any, progress: Any) -> None:
    """Keep the cache in bounds after a build (the policy of config.toml); skipped while
    another build uses the cache, and never a reason for the build to fail."""
    from dockbuild import config
    from dockbuild.engine import gc

    try:
        result = gc.collect(store, config.gc_config())
    except DockbuildError as e:
        progress.message(f"WARNING: cache garbage collection skipped: {e.message}")
        return
    except OSError as e:
        progress.message(f"WARNING: cache garbage collection failed: {e}")
        return
    if result is not None and result.removed:
        progress.message(
            f"cache GC: removed {len(result.removed)} records, freed {gc.human_size(result.freed)}"
        )


def _no_cache_ops(request: BuildRequest, result: Any, progress: Any) -> frozenset[str]:
    """The ops of the stages --no-cache-filter names (by name or index), as the frontend
    reports them per stage."""
    if not request.no_cache_filter:
        return frozenset()
    if request.no_cache:
        raise DockbuildError("--no-cache and --no-cache-filter cannot currently be used together")
    digests: set[str] = set()
    for name in request.no_cache_filter:
        ops = result.stage_ops.get(name.lower())
        if ops is None:
            progress.message(f"WARNING: --no-cache-filter {name}: no stage of that name")
            continue
        digests.update(op.digest for op in ops)
    return frozenset(digests)


def _run_options(request: BuildRequest) -> dict[str, Any]:
    """--secret, --ssh and --allow, checked before anything runs (engine/mounts.py uses them)."""
    from dockbuild.engine.mounts import ENTITLEMENTS
    from dockbuild.secrets import parse_secret, parse_ssh

    for entitlement in request.allow:
        if entitlement not in ENTITLEMENTS:
            raise DockbuildError(
                f"invalid --allow {entitlement!r}", hint=f"one of {', '.join(ENTITLEMENTS)}"
            )
    secrets = {s.id: s for s in map(parse_secret, request.secrets)}
    ssh = {s.id: s for s in map(parse_ssh, request.ssh)}
    allow = set(request.allow)
    if request.network == "host":
        allow.add("network.host")  # as buildx: the build-wide flag is the user's grant
    return {"secrets": secrets, "ssh": ssh, "allow": frozenset(allow)}


def _own_ignore(path: Path) -> tuple[str, ...]:
    """A named local context's own .dockerignore (BuildKit's namedcontext.go)."""
    from dockbuild.frontend.dockerignore import parse_dockerignore

    ignore_file = path / ".dockerignore"
    return tuple(parse_dockerignore(ignore_file.read_bytes())) if ignore_file.is_file() else ()


def _max_parallelism() -> int:
    """How many steps run at once: ``[worker.oci] max-parallelism`` in the config file
    (buildkitd.toml's name), else the number of CPUs."""
    from dockbuild import config

    worker = config.load().get("worker") or {}
    value = (worker.get("oci") or {}).get("max-parallelism") if isinstance(worker, dict) else None
    if value is None:
        return os.cpu_count() or 2
    if not isinstance(value, int) or value < 1:
        raise DockbuildError(f"config: [worker.oci] max-parallelism must be a positive integer, not {value!r}")
    return value


def _executor(name: str | None) -> Any:
    from dockbuild.engine.executor import get_executor

    return get_executor(name)


# Dockerfiles read from stdin (`-f -`), by the name their errors carry, for snippets.
_STDIN_DOCKERFILES: dict[str, bytes] = {}
STDIN_DOCKERFILE_NAME = "Dockerfile (stdin)"


def _read_dockerfile(request: BuildRequest, df: Path) -> bytes:
    """The Dockerfile's bytes: the file, or stdin for ``-f -``."""
    if request.dockerfile != "-":
        return df.read_bytes()
    if request.context == "-":
        raise DockbuildError(
            "the Dockerfile and the build context cannot both be read from stdin",
            hint="pass the context as a directory, or the Dockerfile with -f FILE",
        )
    text = sys.stdin.buffer.read()
    _STDIN_DOCKERFILES[STDIN_DOCKERFILE_NAME] = text
    return text


def check(request: BuildRequest) -> list[Any]:
    """``--check``: convert the Dockerfile (every stage unless --target) and return the
    build-check warnings, without building anything."""
    from dockbuild.engine.sources.image import ImageSources
    from dockbuild.engine.store import Store

    store = Store()
    try:
        inputs = _inputs(request)
        sources = ImageSources(
            store, {k: v[0] for k, v in inputs.layouts.items()}, pull=request.pull
        )
        return list(_frontend_definition(request, inputs, sources).checks)
    except DockbuildError as e:
        _attach_snippet(e)
        raise
    finally:
        store.close()


def snippet(location: Any) -> list[str]:
    """The Dockerfile lines around a location, BuildKit style (`>>>` marks the lines)."""
    err = DockbuildError("", location=location)
    _attach_snippet(err)
    return list(getattr(err, "snippet", []))


def _attach_snippet(err: DockbuildError) -> None:
    """Give an error with a Dockerfile location the lines around it, as BuildKit shows."""
    loc = err.location
    if loc is None:
        return
    if loc.filename in _STDIN_DOCKERFILES:
        text = _STDIN_DOCKERFILES[loc.filename].decode(errors="replace")
    elif os.path.exists(loc.filename):
        try:
            text = Path(loc.filename).read_text(errors="replace")
        except OSError:
            return
    else:
        return
    lines = text.splitlines()
    end = loc.end_line or loc.start_line
    first = max(1, loc.start_line - 2)
    last = min(len(lines), end + 2)
    snippet = []
    for n in range(first, last + 1):
        mark = ">>>" if loc.start_line <= n <= end else "   "
        snippet.append(f" {n:>3} | {mark} {lines[n - 1]}")
    err.snippet = snippet  # type: ignore[attr-defined]
