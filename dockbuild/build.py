"""One build, start to end: request -> frontend -> engine.solve -> outputs.export.

This module wires the rooms together and owns nothing else: reading the Dockerfile and
.dockerignore, naming the contexts, choosing the outputs. It is the only place that
knows both the frontend and the engine.
"""

from __future__ import annotations

import os
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
    platform: str | None = None
    executor: str | None = None
    network: str = "default"
    iidfile: str | None = None
    metadata_file: str | None = None


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
    from dockbuild.frontend.dockerignore import parse_dockerignore

    if request.context == "-":
        raise DockbuildError("a build context on stdin is not supported yet", hint="pass a directory")
    ctx = Path(request.context)
    if not ctx.is_dir():
        raise DockbuildError(f"unable to prepare context: path {request.context!r} not found")
    if request.dockerfile:
        df = Path(request.dockerfile)
    else:
        df = ctx / "Dockerfile"
        if not df.exists() and (ctx / "dockerfile").exists():
            df = ctx / "dockerfile"
    try:
        text = df.read_bytes()
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
        elif "://" in value:
            raise DockbuildError(f"build context {name}={value}: this kind of context is not supported yet")
        else:
            if not Path(value).is_dir():
                raise DockbuildError(f"build context {name}={value}: not a directory")
            locals_[name] = Path(value)
    return _Inputs(str(df), text, tuple(patterns), locals_, layouts, images)


def _split_layout(text: str) -> tuple[str, str | None, str | None]:
    """``PATH[:TAG]`` or ``PATH@sha256:...`` as buildx spells an oci-layout context."""
    if "@" in text:
        path, _, digest = text.rpartition("@")
        return path, None, digest
    head, sep, tail = text.rpartition(":")
    if sep and "/" not in tail and head:
        return head, tail, None
    return text, None, None


def _frontend_definition(request: BuildRequest, inputs: _Inputs, sources: Any) -> Any:
    from dockbuild.frontend import convert

    def resolve(name: str) -> convert.NamedSource | None:
        """A FROM / --from name: a named context, else (for FROM) a registry image."""
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
    from dockbuild.engine.solver import SolveOptions, Solver
    from dockbuild.engine.sources.image import ImageSources
    from dockbuild.engine.sources.local import LocalDir
    from dockbuild.engine.store import Store
    from dockbuild.outputs import export
    from dockbuild.progress import make_progress

    platform = request.platform or HOST_PLATFORM
    if platform != HOST_PLATFORM:
        raise DockbuildError(f"platform {platform} is not supported yet", hint=f"use {HOST_PLATFORM}")
    outputs = export.parse_outputs(
        request.outputs, tags=request.tags, stdout_is_tty=sys.stdout.isatty()
    )
    progress = make_progress(request.progress)
    store = Store()
    solver = None
    try:
        vertex = progress.vertex(f"[internal] load build definition from {request.dockerfile or 'Dockerfile'}")
        inputs = _inputs(request)
        vertex.log("stdout", f"transferring dockerfile: {len(inputs.dockerfile_text)}B done\n".encode())
        vertex.done()
        sources = ImageSources(
            store, {k: v[0] for k, v in inputs.layouts.items()}, pull=request.pull
        )
        result = _frontend_definition(request, inputs, sources)
        for warning in result.warnings:
            progress.message(warning)
        locals_ = {
            name: LocalDir(path, inputs.ignore_patterns if name == "context" else ())
            for name, path in inputs.local_dirs.items()
        }
        solver = Solver(
            store,
            progress,
            locals_,
            sources,
            lambda: _executor(request.executor),
            SolveOptions(no_cache=request.no_cache),
        )
        state = solver.solve(result.root)
        config = export.finish_config(result.image_config, result.history_ops, solver)
        image = export.Image(state=state, config=config, layer_paths=solver.layer_paths(state))
        ids = export.export_all(store, image, outputs, progress)
        if request.iidfile and ids.image_id:
            export.write_atomic(Path(request.iidfile), ids.image_id.encode())
        if request.metadata_file:
            export.write_metadata(Path(request.metadata_file), ids)
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
        progress.close()
        store.close()
    if request.quiet and ids.image_id:
        print(ids.image_id)


def _executor(name: str | None) -> Any:
    from dockbuild.engine.executor import get_executor

    return get_executor(name)


def _attach_snippet(err: DockbuildError) -> None:
    """Give an error with a Dockerfile location the lines around it, as BuildKit shows."""
    loc = err.location
    if loc is None or not os.path.exists(loc.filename):
        return
    try:
        lines = Path(loc.filename).read_text(errors="replace").splitlines()
    except OSError:
        return
    end = loc.end_line or loc.start_line
    first = max(1, loc.start_line - 2)
    last = min(len(lines), end + 2)
    snippet = []
    for n in range(first, last + 1):
        mark = ">>>" if loc.start_line <= n <= end else "   "
        snippet.append(f" {n:>3} | {mark} {lines[n - 1]}")
    err.snippet = snippet  # type: ignore[attr-defined]
