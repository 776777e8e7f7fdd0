"""One build, start to end: request -> contexts -> frontend -> engine.solve -> outputs.

This module wires the rooms together and owns nothing else. It is the only place that
knows both the frontend and the engine. It prints nothing: steps and warnings go to
progress, results and errors back to the CLI.

Start-up matters. The contexts are resolved first, and the context walk forked
(contexts.local_dirs), before the store loads. A request whose result record holds
(dockbuild/resultcache.py) then goes straight to the outputs: the frontend, the solver
and the registry client load only for a build that runs its steps.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import NamedTuple

from dockbuild import contexts
from dockbuild.errors import DockbuildError

TYPE_CHECKING = False  # typing and the heavy modules load only for the type checker
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from contextlib import ExitStack
    from pathlib import Path

    from dockbuild import llb, resultcache
    from dockbuild.engine.cacheio import CacheSpec
    from dockbuild.engine.executor import Executor
    from dockbuild.engine.solver import Solver
    from dockbuild.engine.sources.image import ImageSources
    from dockbuild.engine.sources.local import FileDigests, LocalDir
    from dockbuild.engine.store import Store
    from dockbuild.frontend.checks import CheckWarning
    from dockbuild.frontend.convert import Definition
    from dockbuild.history import Record
    from dockbuild.outputs.exporter import ExportIds, Image
    from dockbuild.outputs.spec import OutputSpec
    from dockbuild.progress import Progress
    from dockbuild.secrets import SecretSource, SSHSource



# Named tuples, not dataclasses: a no-op rebuild loads this module, and the dataclasses
# module (inspect, ast, dis) is a large part of its start-up. The request is never
# changed: its sequences are tuples, its mappings read only.


class BuildRequest(NamedTuple):
    context: str
    dockerfile: str | None = None
    dockerfile_text: bytes | None = None  # `-f -`: the Dockerfile the CLI read from stdin
    tags: tuple[str, ...] = ()
    target: str | None = None
    build_args: Mapping[str, str | None] = {}
    build_contexts: Mapping[str, str] = {}
    outputs: tuple[str, ...] = ()
    labels: Mapping[str, str] = {}
    progress: str = "auto"
    quiet: bool = False
    no_cache: bool = False
    pull: bool = False
    no_cache_filter: tuple[str, ...] = ()  # stage names
    explain_cache: bool = False
    cache_from: tuple[str, ...] = ()  # --cache-from specs
    cache_to: tuple[str, ...] = ()  # --cache-to specs
    platform: str | None = None  # --platform: comma-separated; None = this machine's
    executor: str | None = None
    network: str = "default"
    add_hosts: tuple[str, ...] = ()  # --add-host, each "HOST:IP"
    shm_size: int | None = None  # --shm-size in bytes; None: the executor's default
    secrets: tuple[str, ...] = ()  # --secret values
    ssh: tuple[str, ...] = ()  # --ssh values
    allow: tuple[str, ...] = ()  # --allow entitlements
    iidfile: str | None = None
    metadata_file: str | None = None
    check: bool = False  # --check: run the build checks only
    push: bool = False
    load: bool = False
    squash: bool = False


class BuildResult(NamedTuple):
    """What a finished build reports back to the CLI."""

    image_id: str | None  # the config digest (an index's digest for several platforms); None when no output made an image
    wrote_stdout: bool  # an output (`-o -`, the default on a pipe) wrote to stdout


class RunOptions(NamedTuple):
    """--secret, --ssh and --allow, checked (engine/mounts.py uses them)."""

    secrets: dict[str, SecretSource]
    ssh: dict[str, SSHSource]
    allow: frozenset[str]


def build(request: BuildRequest) -> BuildResult:
    """Build what ``request`` asks for; a DockbuildError says why not."""
    from contextlib import ExitStack

    from dockbuild import resultcache
    from dockbuild.engine.cacheroot import default_root
    from dockbuild.engine.sources.local import FileDigests

    targets = target_platforms(request)
    with ExitStack() as cleanup:
        inputs = _resolve(request)
        # Context file digests persist in the cache db: an unchanged context is a stat
        # walk. With a db to read already, that walk starts before the store loads.
        root = default_root().absolute()
        digests = contexts.early_digests(root / "db.sqlite")
        locals_ = _open_locals(cleanup, inputs, digests) if digests is not None else {}
        outputs, cache_from, cache_to = _parse_specs(request, targets)  # usage errors first
        from dockbuild.outputs.destinations import check_destinations

        check_destinations(  # every path the user gave, before any step runs
            outputs,
            iidfile=request.iidfile,
            metadata_file=request.metadata_file,
            cache_to=cache_to,
            secrets=request.secrets,
        )
        from dockbuild.engine.store import Store

        store = Store(root)  # a cache it cannot open is an error before any progress shows
        cleanup.callback(store.close)
        if digests is None:
            locals_ = _open_locals(cleanup, inputs, FileDigests(root / "db.sqlite"))
        from dockbuild.progress import make_progress

        progress = make_progress(request.progress)
        cleanup.callback(progress.close)
        record = _open_record(cleanup, root, request, inputs, progress)
        vertex = progress.vertex(f"[internal] load build definition from {request.dockerfile or 'Dockerfile'}")
        vertex.log("stdout", f"transferring dockerfile: {len(inputs.dockerfile_text)}B done\n".encode())
        vertex.done()
        # The result record: a request whose inputs are all unchanged is its outputs only.
        record_cache = resultcache.ResultCache(root / "db.sqlite")
        cleanup.callback(record_cache.close)
        # One record per platform (a multi-platform build's keys name all its platforms);
        # none with --cache-from / --cache-to.
        keys = {} if cache_from or cache_to else {p: _result_key(request, inputs, p, targets) for p in targets}
        recorded = _recorded(request, keys, record_cache, store, locals_, progress)
        if recorded is not None:
            ids = _write_outputs(request, store, recorded, outputs, progress)
            _finish_record(record, progress, outputs, ids)
            return BuildResult(ids.image_id or ids.manifest_digest, any(spec.writes_stdout for spec in outputs))
        from dockbuild.engine import cacheio
        from dockbuild.engine.mounts import check_entitlements
        from dockbuild.engine.solver import SolveOptions, Solver
        from dockbuild.engine.sources.image import ImageSources

        sources = ImageSources(
            store, {k: v.path for k, v in inputs.layouts.items()}, pull=request.pull, platform=targets[0]
        )
        run_options = _run_options(request)
        progress.redact(_secret_values(run_options))
        # The cache manifests arrive while the frontend resolves base images.
        cache_sources = cacheio.open_sources(cache_from, sources.client, progress) if cache_from else None
        resolved: list[tuple[str, str, str]] = []
        # One conversion per platform, as BuildKit's frontend does: a stage that does not
        # depend on the target platform lowers to the same ops, so it is solved once.
        results = [_convert(request, inputs, sources, resolved, p, len(targets) > 1) for p in targets]
        for warning in dict.fromkeys(w for r in results for w in r.warnings):
            progress.message(warning)
        for result in results:
            check_entitlements(result.root, run_options.allow)
        result = results[0]
        # The contexts this build reads, digested before any step reads them.
        reads = sorted({name for r in results for name in _local_reads(r.root)})
        read = resultcache.context_digests(locals_, reads) if keys else None
        options = SolveOptions(
            no_cache=request.no_cache,
            no_cache_ops=_no_cache_ops(request, results, progress),
            explain=request.explain_cache,
            max_parallel=_max_parallelism(progress),
            secrets=run_options.secrets,
            ssh=run_options.ssh,
            allow=run_options.allow,
        )
        solver = Solver(store, progress, locals_, sources, lambda: _executor(request.executor), options)
        cleanup.callback(solver.close)
        if cache_sources is not None:
            opened = cache_sources()
            for each in results:
                cacheio.import_cache(store, solver, each.root, opened, progress)
        first_step = len(progress.vertices)
        states = solver.solve_all([r.root for r in results])
        solver.runs_done()
        images = {
            p: _image(request, store, solver, r, state, cache_to, progress)
            for p, r, state in zip(targets, results, states, strict=True)
        }
        if keys and read is not None and not any(_reads_remote(r.root) for r in results):
            steps = [v.name for v in progress.vertices[first_step:]]
            pinned = _pinned(resolved)
            warnings = list(dict.fromkeys(w for r in results for w in r.warnings))
            for p in targets:  # each holds the whole build's steps and warnings
                record_cache.put(keys[p], _result(images[p], read, pinned, steps, warnings, solver.solved_keys()))
        ids = _write_outputs(request, store, images, outputs, progress)
        if cache_to:  # every platform's records in one cache manifest, as BuildKit
            cacheio.export_cache(store, solver, [r.root for r in results], cache_to, progress)
        if store.grew:  # a build that added nothing cannot push the cache over a limit
            _collect_garbage(store, progress)
        _finish_record(record, progress, outputs, ids)
    return BuildResult(ids.image_id or ids.manifest_digest, any(spec.writes_stdout for spec in outputs))


def target_platforms(request: BuildRequest) -> list[str]:
    """The platforms --platform asks for, normalised; this machine's when none."""
    from dockbuild import platforms

    if request.platform is None:
        return [platforms.host()]
    try:
        return platforms.parse_list(request.platform)
    except DockbuildError as e:
        from dockbuild.errors import UsageError

        raise UsageError(f"--platform: {e.message}", hint=e.hint) from None


def _secret_values(run_options: RunOptions) -> list[bytes]:
    """The --secret values that can be read now, for progress to mask in step logs (one
    that cannot is an error later, if a step mounts it)."""
    import stat

    values = []
    for source in run_options.secrets.values():
        try:
            # A FIFO or /dev/stdin can be read once: the step's mount reads it, not this.
            if source.path is not None and not stat.S_ISREG(os.stat(source.path).st_mode):
                continue
            values.append(source.read())
        except (DockbuildError, OSError):
            continue
    return values


def _open_record(
    cleanup: ExitStack, root: Path, request: BuildRequest, inputs: contexts.Inputs, progress: Progress
) -> Record | None:
    """The build's history record (dockbuild/history.py), fed by the progress events and
    finished as failed when the build raises; none when the cache root refuses it."""
    from dockbuild import history

    info = history.request_info(request, inputs.dockerfile_name, inputs.dockerfile_text)
    try:
        record = history.Record(root, info)
    except OSError as e:
        progress.message(f"WARNING: no build record: {e}")
        return None
    progress.record = record
    cleanup.push(record.exit)
    return record


def _finish_record(record: Record | None, progress: Progress, outputs: list[OutputSpec], ids: ExportIds) -> None:
    """The outputs written (for the record and the summary line), and the record done."""
    for spec in outputs:
        dest = spec.dest if spec.dest not in (None, "-") else ", ".join(spec.names) or "stdout"
        progress.wrote(f"{spec.type} {dest}")
        if record is not None:
            record.output(spec.type, dest, ids.manifest_digest)
    if record is not None:
        record.finish("completed", image_id=ids.image_id)


def check(request: BuildRequest) -> list[CheckWarning]:
    """``--check``: convert the Dockerfile (every stage unless --target) and return the
    build-check warnings, without building anything."""
    from dockbuild.engine.sources.image import ImageSources
    from dockbuild.engine.store import Store

    store = Store()
    try:
        inputs = _resolve(request)
        sources = ImageSources(store, {k: v.path for k, v in inputs.layouts.items()}, pull=request.pull)
        return list(_convert(request, inputs, sources).checks)
    finally:
        store.close()


def definition(request: BuildRequest) -> dict[str, object]:
    """The LLB graph and image config a request means (``dockbuild debug llb``); for
    several platforms, each platform's under ``platforms`` (its name as key)."""
    from dockbuild import llb
    from dockbuild.engine.sources.image import ImageSources
    from dockbuild.engine.store import Store

    targets = target_platforms(request)
    inputs = _resolve(request)
    store = Store()
    try:
        sources = ImageSources(
            store, {k: v.path for k, v in inputs.layouts.items()}, pull=request.pull, platform=targets[0]
        )
        graphs: dict[str, dict[str, object]] = {}
        for platform in targets:
            result = _convert(request, inputs, sources, platform=platform, multi_platform=len(targets) > 1)
            graphs[platform] = {"llb": llb.to_json(result.root), "config": result.image_config}
        return graphs[targets[0]] if len(targets) == 1 else {"platforms": graphs}
    finally:
        store.close()


def _resolve(request: BuildRequest) -> contexts.Inputs:
    keep_git = request.build_args.get("BUILDKIT_CONTEXT_KEEP_GIT_DIR") in ("1", "true")
    return contexts.resolve(
        request.context,
        request.dockerfile,
        request.build_contexts,
        stdin_dockerfile=request.dockerfile_text,
        keep_git=keep_git,
        commit_times=functools.partial(_commit_times, request),  # asked only for a remote context
    )


def _commit_times(request: BuildRequest) -> bool:
    """Whether git contexts get their files' commit times (SOURCE_DATE_EPOCH is set)."""
    from dockbuild.outputs.export import source_date_epoch

    return source_date_epoch(request.build_args) is not None


def _open_locals(cleanup: ExitStack, inputs: contexts.Inputs, digests: FileDigests) -> dict[str, LocalDir]:
    """The local contexts (their walk maybe started), closed when the build ends."""
    cleanup.callback(digests.close)
    dirs = contexts.local_dirs(inputs, digests)
    for local in dirs.values():
        cleanup.callback(local.stop)
    return dirs


def _parse_specs(
    request: BuildRequest, targets: list[str]
) -> tuple[list[OutputSpec], list[CacheSpec], list[CacheSpec]]:
    """The -o, --cache-from and --cache-to specs; a malformed one (or one that cannot
    take the platforms asked for) is a usage error."""
    from dockbuild.errors import UsageError
    from dockbuild.outputs.spec import parse_outputs

    try:
        _check_tags(request.tags)
        outputs = parse_outputs(
            request.outputs,
            tags=request.tags,
            stdout_is_tty=sys.stdout.isatty(),
            push=request.push,
            load=request.load,
            multi_platform=len(targets) > 1,
        )
        if len(targets) > 1:
            _check_multi_platform(outputs, request, targets)
        if not (request.cache_from or request.cache_to):
            return outputs, [], []
        from dockbuild.engine import cacheio

        cache_from = [cacheio.parse_cache_spec(t, export=False) for t in request.cache_from]
        cache_to = [cacheio.parse_cache_spec(t, export=True) for t in request.cache_to]
    except DockbuildError as e:
        raise UsageError(e.message, hint=e.hint) from e
    return outputs, cache_from, cache_to


def _check_multi_platform(outputs: list[OutputSpec], request: BuildRequest, targets: list[str]) -> None:
    """Outputs that hold one image refuse several platforms, as buildx does."""
    for spec in outputs:
        if spec.type == "docker":
            what = "--load" if spec.load else "type=docker"
            raise DockbuildError(
                f"{what} cannot export several platforms ({', '.join(targets)}): a docker "
                "tarball holds one image, not an image index",
                hint="use -o type=oci,dest=FILE (or --push) for a multi-platform image, "
                "or build one --platform for docker",
            )


def _check_tags(tags: Sequence[str]) -> None:
    """-t names, each a valid image reference (every output that names the image uses it)."""
    if not tags:
        return
    from dockbuild.outputs.image import normalize_name

    for tag in tags:
        try:
            if not tag.strip():
                raise ValueError(f"invalid tag {tag!r}: an empty name")
            normalize_name(tag)
        except ValueError as e:
            raise DockbuildError(f"-t: {e}") from None


def _convert(
    request: BuildRequest,
    inputs: contexts.Inputs,
    sources: ImageSources,
    resolved: list[tuple[str, str, str]] | None = None,
    platform: str | None = None,
    multi_platform: bool = False,
) -> Definition:
    """The frontend's graph for the Dockerfile built for ``platform`` (the first one asked
    for if None), named contexts resolved to sources; ``resolved`` gets (reference,
    platform, pinned identifier) of each registry image resolved."""
    from dockbuild import platforms
    from dockbuild.engine.sources.local import ignore_rules, is_ignored
    from dockbuild.frontend import convert

    def resolve(name: str, platform: str) -> convert.NamedSource | None:
        """A FROM / --from name: a named context, else (for FROM) a registry image."""
        name = contexts.context_name(name, inputs)
        if name in inputs.local_dirs and name != "context":
            return convert.NamedSource("local", f"local://{name}", None, name)
        if name in inputs.layouts:
            layout = inputs.layouts[name]
            info = sources.resolve_layout(name, layout.tag, layout.digest, platform)
            return convert.NamedSource("image", info.identifier, info.config, info.name)
        if name in inputs.images:
            return resolve_image(inputs.images[name], platform)
        return None

    def resolve_image(ref: str, platform: str) -> convert.NamedSource:
        info = sources.resolve_registry(ref, platform)
        if resolved is not None:
            resolved.append((ref, platform, info.identifier))
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
        labels=dict(request.labels),
        platform=platform or target_platforms(request)[0],
        build_platform=platforms.host(),
        explicit_platform=request.platform is not None,
        multi_platform=multi_platform,
        network=request.network,
        extra_hosts=request.add_hosts,
        shm_size=request.shm_size or 0,
        exclude_patterns=inputs.ignore_patterns,
        dockerfile_name=inputs.dockerfile_name,
        all_stages=request.check and request.target is None,
        is_ignored=functools.partial(is_ignored, ignore_rules(inputs.ignore_patterns)),
    )
    return convert.dockerfile_to_llb(
        inputs.dockerfile_text, options, resolve_named=resolve, resolve_image=resolve_image
    )


def _run_options(request: BuildRequest) -> RunOptions:
    """--secret, --ssh and --allow, checked before anything runs."""
    from dockbuild.engine.mounts import ENTITLEMENTS
    from dockbuild.secrets import parse_secret, parse_ssh

    for entitlement in request.allow:
        if entitlement not in ENTITLEMENTS:
            raise DockbuildError(
                f"invalid --allow {entitlement!r}", hint=f"one of {', '.join(ENTITLEMENTS)}"
            )
    allow = set(request.allow)
    if request.network == "host":
        allow.add("network.host")  # as buildx: the build-wide flag is the user's grant
    return RunOptions(
        secrets={s.id: s for s in map(parse_secret, request.secrets)},
        ssh={s.id: s for s in map(parse_ssh, request.ssh)},
        allow=frozenset(allow),
    )


def _image(
    request: BuildRequest,
    store: Store,
    solver: Solver,
    result: Definition,
    state: tuple[str, ...],
    cache_to: list[CacheSpec],
    progress: Progress,
) -> Image:
    """The solved result as the outputs take it: the config marked and timed from the
    cache records (with the inline cache metadata --cache-to type=inline asks for)."""
    from dockbuild.engine import cacheio
    from dockbuild.outputs import export
    from dockbuild.outputs.exporter import Image

    config = export.finish_config(result.image_config, result.history_ops, solver)
    if any(spec.type == "inline" for spec in cache_to):
        if request.squash:
            progress.message("WARNING: --cache-to type=inline is ignored with --squash")
        else:
            inline = cacheio.inline_metadata(store, solver, result.root, state)
            config = cacheio.with_inline_cache(config, inline)
    return Image(
        state=state,
        config=config,
        base_layers=export.base_layer_count(config, result.history_ops, len(state)),
        epoch=export.source_date_epoch(request.build_args),
        squash=request.squash,
        sources=export.registry_sources(result.root),
        history_times=export.history_times(config, result.history_ops, solver),
    )


def _write_outputs(
    request: BuildRequest, store: Store, images: dict[str, Image], outputs: list[OutputSpec], progress: Progress
) -> ExportIds:
    """Write the image (one per platform) to every output, --iidfile and --metadata-file."""
    from pathlib import Path

    if not outputs:
        progress.message(
            "Build result kept in the cache (no output requested). "
            "Export it with -o type=docker|oci|local|tar[,dest=PATH], "
            "or pipe stdout: dockbuild ... | docker load"
        )
        if not request.metadata_file:  # nothing to write: the exporters need not load
            from dockbuild.outputs.exporter import ExportIds

            return ExportIds()
    from dockbuild.outputs.export import export_all
    from dockbuild.outputs.metadata import write_atomic, write_metadata

    ids = export_all(store, images, outputs, progress)
    image_id = ids.image_id or ids.manifest_digest  # several platforms: the index's digest
    if request.iidfile and image_id:
        write_atomic(Path(request.iidfile), image_id.encode())
    if request.metadata_file:
        write_metadata(Path(request.metadata_file), ids)
    return ids


# -- the result record (dockbuild/resultcache.py) ----------------------------------------


def _result_key(request: BuildRequest, inputs: contexts.Inputs, platform: str, targets: list[str]) -> str:
    """The record key: everything that decides the result and is known before the
    Dockerfile is converted (docs/cache.md, "The result record")."""
    import hashlib
    from pathlib import Path

    from dockbuild import resultcache
    from dockbuild.config import config_path

    def ids(specs: Sequence[str], parse: Callable[[str], SecretSource | SSHSource]) -> list[str]:
        """The ids of --secret or --ssh specs (never their values: as in BuildKit, a
        secret does not decide a cached result)."""
        return sorted(parse(spec).id for spec in specs)

    def where(spec: str, name: str) -> str:
        """A local context by its absolute path; any other by what the user wrote."""
        local = inputs.local_dirs.get(name)
        return str(local.absolute()) if local is not None and Path(spec).is_dir() else spec

    fields = {
        "dockerfile": hashlib.sha256(inputs.dockerfile_text).hexdigest(),
        "dockerfile_name": inputs.dockerfile_name,
        "ignore": list(inputs.ignore_patterns),
        "context": where(request.context, "context"),
        "build_contexts": {name: where(spec, name) for name, spec in request.build_contexts.items()},
        "layouts": {
            name: resultcache.file_digest(layout.path / "index.json")
            for name, layout in inputs.layouts.items()
        },
        "target": request.target,
        "build_args": {k: v if v is not None else os.environ.get(k) for k, v in request.build_args.items()},
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH"),
        "labels": request.labels,
        "platform": platform,
        "explicit_platform": request.platform is not None,
        "network": request.network,
        "add_hosts": list(request.add_hosts),
        "shm_size": request.shm_size,
        "secrets": ids(request.secrets, _parse_secret) if request.secrets else [],
        "ssh": ids(request.ssh, _parse_ssh) if request.ssh else [],
        "allow": sorted(set(request.allow)),
        "squash": request.squash,
        "executor": request.executor or os.environ.get("DOCKBUILD_EXECUTOR"),
        "config": resultcache.file_digest(config_path()),
    }
    if len(targets) > 1:  # a platform's record of a multi-platform build is its alone
        fields["platforms"] = targets
    return resultcache.request_key(fields)


def _parse_secret(spec: str) -> SecretSource:
    from dockbuild.secrets import parse_secret

    return parse_secret(spec)


def _parse_ssh(spec: str) -> SSHSource:
    from dockbuild.secrets import parse_ssh

    return parse_ssh(spec)


def _local_reads(root: llb.Op | None) -> list[str]:
    """The local contexts a graph reads (its local:// sources)."""
    from dockbuild import llb

    if root is None:
        return []
    names = {
        op.identifier[len("local://") :]
        for op in llb.walk(root)
        if isinstance(op, llb.SourceOp) and op.identifier.startswith("local://")
    }
    return sorted(names)


def _reads_remote(root: llb.Op | None) -> bool:
    """Whether a graph fetches an HTTP or git source: asked again on every build."""
    from dockbuild import llb
    from dockbuild.engine.cachekeys import is_remote

    return root is not None and any(is_remote(op) for op in llb.walk(root))


def _pinned(resolved: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """(tag, platform, manifest digest) of each tag the build resolved (by digest: none)."""
    from dockbuild.engine.registry.reference import parse_reference

    pinned = []
    for text, platform, identifier in resolved:
        ref = parse_reference(text)
        if ref.digest is None:
            pinned.append((str(ref), platform, identifier.rpartition("@")[2]))
    return pinned


def _result(
    image: Image,
    read: dict[str, str],
    pinned: list[tuple[str, str, str]],
    steps: list[str],
    warnings: list[str],
    records: list[str],
) -> resultcache.Result:
    from dockbuild import resultcache

    fields = image._asdict()
    fields["history_times"] = [[k, v] for k, v in image.history_times.items()]
    return resultcache.Result(fields, read, pinned, steps, [str(w) for w in warnings], records)


def _recorded(
    request: BuildRequest,
    keys: dict[str, str],
    results: resultcache.ResultCache,
    store: Store,
    locals_: dict[str, LocalDir],
    progress: Progress,
) -> dict[str, Image] | None:
    """The image of each platform the result records hold for ``keys``, if all still
    hold (the build's steps then shown as cached); None when the request runs its steps
    (--no-cache, --pull, --no-cache-filter and --explain-cache always do)."""
    from dockbuild import resultcache

    if not keys or request.no_cache or request.pull or request.no_cache_filter or request.explain_cache:
        return None
    found: dict[str, resultcache.Result] = {}
    for platform, key in keys.items():
        record = results.get(key)
        if record is None or not resultcache.still_valid(record, store, locals_):
            return None
        found[platform] = record
    first = next(iter(found.values()))
    for name in first.steps:
        progress.vertex(name).cached()
    for warning in first.warnings:
        progress.message(warning)
    for record in found.values():
        store.touch_records(record.records)  # for GC, the steps were used as by a cached build
    return {platform: _replay(record) for platform, record in found.items()}


def _replay(found: resultcache.Result) -> Image:
    """The recorded result's image."""
    from dockbuild.outputs.exporter import Image

    fields = dict(found.image)
    fields["state"] = tuple(fields["state"])
    fields["sources"] = tuple(fields["sources"])
    fields["history_times"] = {int(k): v for k, v in fields["history_times"]}
    return Image(**fields)


def _collect_garbage(store: Store, progress: Progress) -> None:
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


def _max_parallelism(progress: Progress) -> int:
    """How many steps run at once: as config.toml says, else the number of CPUs. A broken
    config file is a warning, never a failed build (docs/cache.md)."""
    from dockbuild import config

    cpus = os.cpu_count() or 2
    try:
        return config.max_parallelism() or cpus
    except DockbuildError as e:
        progress.message(f"WARNING: {e.message}; running up to {cpus} steps at once")
        return cpus


def _executor(name: str | None) -> Executor:
    from dockbuild.engine.executor.choice import get_executor

    return get_executor(name)


def _no_cache_ops(request: BuildRequest, results: list[Definition], progress: Progress) -> frozenset[str]:
    """The ops of the stages --no-cache-filter names (by name or index), as the frontend
    reports them per stage (for every platform)."""
    if not request.no_cache_filter:
        return frozenset()
    if request.no_cache:
        raise DockbuildError("--no-cache and --no-cache-filter cannot currently be used together")
    digests: set[str] = set()
    for name in request.no_cache_filter:
        if name.lower() not in results[0].stage_ops:
            progress.message(f"WARNING: --no-cache-filter {name}: no stage of that name")
            continue
        for result in results:
            digests.update(op.digest for op in result.stage_ops[name.lower()])
    return frozenset(digests)
