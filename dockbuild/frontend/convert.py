"""Dockerfile -> LLB: stages, ARG scoping, ONBUILD, the image config and history, as
BuildKit's dockerfile2llb builds them.

Pure: the only way out is the two resolver callbacks the caller passes in (a named
context or a registry image -> a pinned identifier and its config), so this module runs
without a container runtime, a registry or a cache. The instructions are converted by the
handlers in convert_config, convert_copy and convert_run, found in `HANDLERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dockbuild import llb, platforms
from dockbuild.errors import (
    DockbuildError,
    DockerfileError,
    Location,
    RegistryError,
    RegistryUnreachableError,
)
from dockbuild.frontend import checks, parser
from dockbuild.frontend import convert_config as config_
from dockbuild.frontend import instructions as ins
from dockbuild.frontend.convert_config import NON_ENV_ARGS, upper_first
from dockbuild.frontend.convert_copy import add, copy
from dockbuild.frontend.convert_run import PROXY_ARGS, run
from dockbuild.frontend.parse_instructions import parse_instruction
from dockbuild.frontend.shell import Lex, ShellError
from dockbuild.frontend.stages import (
    NamedSource,
    Stage,
    StageState,
    check_cycles,
    defined,
    meta_arg_scope,
    parse_stages,
    similar_stage,
    stage_by_name,
    stage_by_ref,
    target_stage,
)
from dockbuild.frontend.suggest import suggest

__all__ = ["ConvertOptions", "Definition", "NamedSource", "dockerfile_to_llb"]

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Build args that configure the build itself; never reported as unused.
BUILDKIT_ARGS = {
    "BUILDKIT_BUILD_NAME",
    "BUILDKIT_CACHE_MOUNT_NS",
    "BUILDKIT_CONTEXT_KEEP_GIT_DIR",
    "BUILDKIT_DOCKERFILE_CHECK",
    "BUILDKIT_INLINE_CACHE",
    "BUILDKIT_MULTI_PLATFORM",
    "BUILDKIT_SANDBOX_HOSTNAME",
    "BUILDKIT_SBOM_SCAN_CONTEXT",
    "BUILDKIT_SBOM_SCAN_STAGE",
    "BUILDKIT_SYNTAX",
    "SOURCE_DATE_EPOCH",
}
# The instructions BuildKit numbers in progress names ([stage 2/5] ...), besides FROM.
_COUNTED_STEPS = (ins.AddCommand, ins.CopyCommand, ins.RunCommand, ins.WorkdirCommand)


@dataclass
class ConvertOptions:
    target: str | None = None
    build_args: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    # The platform built for (TARGETPLATFORM), and the machine's (BUILDPLATFORM); both
    # normalised (dockbuild.platforms.normalize).
    platform: str = "linux/amd64"
    build_platform: str = "linux/amd64"
    # --platform was given: the image config says `platform` whatever its last stage's
    # base says (BuildKit's !implicitTarget); several: progress names carry the platform.
    explicit_platform: bool = False
    multi_platform: bool = False
    network: str = "default"
    extra_hosts: tuple[str, ...] = ()  # --add-host, as "name:ip"
    shm_size: int = 0  # --shm-size in bytes; 0 = the default 64 MiB
    exclude_patterns: tuple[str, ...] = ()
    dockerfile_name: str = "Dockerfile"
    # Convert every stage, not only those the target needs (`--check` without --target).
    all_stages: bool = False
    # Whether .dockerignore excludes a context path (the CopyIgnoredFile check); the
    # caller passes the engine's matcher, so both read the patterns the same way.
    is_ignored: Callable[[str], bool] | None = None


@dataclass
class Definition:
    root: llb.Op | None
    image_config: dict[str, Any]
    # One entry per history entry: the op whose layer it describes (its empty_layer is
    # known only once solved), or None to keep the entry as it is.
    history_ops: list[llb.Op | None]
    warnings: list[str]
    checks: list[checks.CheckWarning] = field(default_factory=list)
    # The ops each stage's own steps made (RUN, COPY, ADD, WORKDIR; not its base), by
    # stage name and by stage index ("0", "1", ...): what --no-cache-filter names. A
    # stage the target does not need has no ops.
    stage_ops: dict[str, tuple[llb.Op, ...]] = field(default_factory=dict)


# (name, platform) -> what a name outside the Dockerfile stands for, for that platform.
ResolveNamed = Callable[[str, str], NamedSource | None]
ResolveImage = Callable[[str, str], NamedSource]
# An instruction's converter: (converter, stage, instruction, progress name).
Handler = Callable[["Converter", StageState, Any, str], None]

HANDLERS: dict[type[ins.Instruction], Handler] = {
    ins.AddCommand: add,
    ins.ArgCommand: config_.arg,
    ins.CmdCommand: config_.cmd,
    ins.CopyCommand: copy,
    ins.EntrypointCommand: config_.entrypoint,
    ins.EnvCommand: config_.env,
    ins.ExposeCommand: config_.expose,
    ins.HealthcheckCommand: config_.healthcheck,
    ins.LabelCommand: config_.label,
    ins.MaintainerCommand: config_.maintainer,
    ins.OnbuildCommand: config_.onbuild,
    ins.RunCommand: run,
    ins.ShellCommand: config_.shell,
    ins.StopSignalCommand: config_.stopsignal,
    ins.UserCommand: config_.user,
    ins.VolumeCommand: config_.volume,
    ins.WorkdirCommand: config_.workdir,
}


def dockerfile_to_llb(
    text: bytes | str,
    options: ConvertOptions,
    resolve_named: ResolveNamed,
    resolve_image: ResolveImage,
) -> Definition:
    return Converter(text, options, resolve_named, resolve_image).run()


class Converter:
    """One conversion: the stage table, the global scope and what every handler shares."""

    def __init__(
        self,
        text: bytes | str,
        options: ConvertOptions,
        resolve_named: ResolveNamed,
        resolve_image: ResolveImage,
    ) -> None:
        self.opts = options
        self.current: StageState | None = None  # the stage of the instruction dispatched
        self.onbuild = False  # whether that instruction is an ONBUILD trigger
        self._resolve_named = resolve_named
        self._resolve_image = resolve_image
        if not text:
            raise DockerfileError(
                "the Dockerfile cannot be empty", location=Location(options.dockerfile_name, 1, 1)
            )
        self.result = parser.parse(text, filename=options.dockerfile_name)
        self.lex = Lex(self.result.escape_token)
        build_arg_check = options.build_args.get("BUILDKIT_DOCKERFILE_CHECK")
        self.linter = checks.Linter(checks.check_config_of(self.result, text, build_arg_check))
        for w in self.result.warnings:
            if w.rule == "NoEmptyContinuation":
                self.linter.run(w.rule, "Empty continuation line", self._loc(w.line))
        specs, meta_args = parse_stages(self.result)
        if not specs:
            raise DockerfileError(
                "dockerfile contains no stages to build",
                location=meta_args[0].location if meta_args else self._loc(1),
            )
        self.stages = [StageState(spec) for spec in specs]
        checks.check_instructions(specs, self.result, self.linter)
        target = target_stage(self.stages, options.target)
        meta = meta_arg_scope(
            meta_args,
            target,
            (options.platform, options.build_platform),
            options.build_args,
            self.lex,
            self.linter,
        )
        checks.check_from_args(specs, meta.defaults, meta.names, self.lex, self.linter)
        self.used_args = meta.used
        self.global_args = meta.scope
        self.context = llb.SourceOp(
            "local://context",
            attrs=(("exclude", "\n".join(options.exclude_patterns)),)
            if options.exclude_patterns
            else (),
            name="[internal] load build context",
        )

    def _loc(self, line: int) -> Location:
        return Location(self.opts.dockerfile_name, line, line)

    # -- scopes ------------------------------------------------------------------------

    def expand(self, word: str, env: dict[str, str], location: Location) -> str:
        """A word expanded in `env`; inside a stage, undefined names are reported."""
        if self.lex.is_plain(word):
            return word
        try:
            if self.current is None:
                return self.lex.process_word(word, env)
            result, _, unmatched = self.lex.process_word_with_matches(word, env)
        except ShellError as e:
            raise DockerfileError(str(e), location=location) from None
        if unmatched:
            self._report_undefined(unmatched, env, location)
        return result

    def expand_words(self, word: str, env: dict[str, str], location: Location) -> list[str]:
        try:
            return self.lex.process_words(word, env)
        except ShellError as e:
            raise DockerfileError(str(e), location=location) from None

    def _report_undefined(self, names: set[str], env: dict[str, str], location: Location) -> None:
        assert self.current is not None
        stage = self.current
        for name in sorted(names):
            if name in stage.args or name in NON_ENV_ARGS:
                continue
            match = suggest(name, list(env))
            message = f"Usage of undefined variable '${name}'"
            if match:
                message += f" (did you mean ${match}?)"
            self.linter.run("UndefinedVar", message, location)

    # -- sources -----------------------------------------------------------------------

    def resolve_named(self, name: str, platform: str | None = None) -> NamedSource | None:
        """A named context (``--build-context``) for ``platform`` (the target's if None)."""
        return self._resolve_named(name, platform or self.opts.platform)

    def resolve_image(
        self,
        ref: str,
        location: Location,
        what: str,
        before: int | None = None,
        platform: str | None = None,
    ) -> NamedSource:
        """A registry image for a FROM or --from name that is no stage. A failure names
        the Dockerfile line, a stage name close to `ref` (among the stages above `before`)
        and, when no registry answered, the ways to build without one."""
        try:
            return self._resolve_image(ref, platform or self.opts.platform)
        except RegistryError as err:
            message = f"{what}: {err.message}"
            match = similar_stage(self.stages, ref, before)
            if match:
                message = f'{what}: "{ref}" is not a stage (did you mean {match}?) nor an image: {err.message}'
            hint = err.hint
            if isinstance(err, RegistryUnreachableError):
                hint = (
                    f"to build without reaching a registry, pass --build-context {ref}=... (a "
                    "directory, docker-image://REF or oci-layout://PATH), or set a reachable "
                    'mirror in config.toml ([registry."HOST"] mirrors = [...])'
                )
            raise type(err)(message, hint=hint, location=location) from err
        except DockbuildError as err:  # a reference that does not parse, ...
            if err.location is None:
                err.location = location
            raise

    def copy_source(self, stage: StageState, from_: str, location: Location) -> llb.Op | None:
        """What `--from` (COPY, ADD) or `from=` (RUN --mount) names: the build context
        when empty, else a named context, a stage or an image."""
        if not from_:
            return self.context
        ref = self.expand(from_, defined(self.global_args), location)
        named = self.resolve_named(ref)
        if named is not None:
            if named.kind == "local":
                return llb.SourceOp(named.identifier, name=f"[internal] load build context {ref}")
            return llb.SourceOp(
                named.identifier, platform=self.opts.platform, name=self._from_name(ref, named)
            )
        dep = stage_by_ref(self.stages, ref)
        if dep is not None:
            if dep is stage:
                raise DockerfileError(
                    f"circular dependency detected on stage: {ref}", location=location
                )
            return dep.state
        named = self.resolve_image(ref, location, f"--from={ref}")
        return llb.SourceOp(
            named.identifier, platform=self.opts.platform, name=self._from_name(ref, named)
        )

    def _from_name(self, ref: str, named: NamedSource) -> str:
        """The progress name of an image a --from reads. No platform even when several are
        built: BuildKit's implicit stage for it counts no steps, so its prefixCommand adds
        no prefix; the pinned digest tells the platforms' images apart."""
        return f"[{ref}] FROM {named.name}"

    # -- stage graph -------------------------------------------------------------------

    def _base_name(self, stage: StageState) -> str:
        spec = stage.spec
        name = self.expand(spec.base_name, defined(self.global_args), spec.location)
        if name == "":
            raise DockerfileError(
                f"base name ({spec.base_name}) should not be blank", location=spec.location
            )
        return name

    def _base(self, stage: StageState) -> StageState | NamedSource | None:
        """What a stage starts from: an earlier stage, an image or None for scratch
        (resolved once)."""
        if stage.base_resolved:
            return stage.base
        try:
            self._resolve_base(stage)
        except DockbuildError as err:  # a named context's error (no platform, ...): its FROM
            if err.location is None:
                err.location = stage.spec.location
            raise
        return stage.base

    def _resolve_base(self, stage: StageState) -> None:
        spec = stage.spec
        platform = self._from_platform(stage)
        stage.platform = platform or self.opts.platform
        named = (
            self.resolve_named(spec.name, stage.platform)
            if spec.name and spec.name != "context"
            else None
        )
        if named is not None:
            # A named context with the stage's name replaces the stage.
            stage.base = self._image_source(named, spec)
            stage.commands = []
        else:
            base_name = self._base_name(stage)
            earlier = stage_by_name(self.stages, base_name, before=spec.index)
            if earlier is not None:
                stage.base = earlier
                if not platform:  # a stage built on a stage builds for its platform
                    self._base(earlier)
                    stage.platform = earlier.platform
            elif base_name == "scratch":
                stage.base = None
            else:
                named = (
                    self.resolve_named(base_name, stage.platform)
                    if base_name != "context"
                    else None
                )
                if named is None:
                    named = self.resolve_image(
                        base_name,
                        spec.location,
                        f"FROM {base_name}",
                        before=spec.index,
                        platform=stage.platform,
                    )
                    checks.check_base_platform(
                        base_name, stage.platform, named.config, spec.location, self.linter
                    )
                stage.base = self._image_source(named, spec)
        stage.base_resolved = True

    def _image_source(self, named: NamedSource, spec: Stage) -> NamedSource:
        if named.kind != "image":
            raise DockerfileError(
                f"FROM {spec.base_name}: a local directory context cannot be a base image",
                location=spec.location,
            )
        return named

    def _commands(self, stage: StageState) -> list[ins.Instruction]:
        """The stage's instructions, after the ONBUILD triggers of its base."""
        if stage.commands is not None:
            return stage.commands
        base = self._base(stage)
        if stage.commands is not None:  # replaced by a named context
            return stage.commands
        expressions: list[str] = []
        if isinstance(base, StageState):
            expressions = [
                c.expression for c in base.spec.commands if isinstance(c, ins.OnbuildCommand)
            ]
        elif base is not None:
            expressions = list(((base.config or {}).get("config") or {}).get("OnBuild") or [])
        triggers = [self._trigger(expr, stage) for expr in expressions]
        stage.triggers = len(triggers)
        stage.commands = [*triggers, *stage.spec.commands]
        return stage.commands

    def _trigger(self, expression: str, stage: StageState) -> ins.Instruction:
        loc = stage.spec.location
        try:
            result = parser.parse(expression, filename=self.opts.dockerfile_name)
            if len(result.children) != 1:
                raise DockerfileError("onbuild trigger should be a single expression")
            node = result.children[0]
            node.start_line, node.end_line = loc.start_line, loc.end_line or loc.start_line
            cmd = parse_instruction(node, self.opts.dockerfile_name)
        except DockerfileError as err:
            raise DockerfileError(f"ONBUILD {expression}: {err.message}", location=loc) from None
        if isinstance(cmd, ins.FromCommand | ins.OnbuildCommand | ins.MaintainerCommand):
            raise DockerfileError(
                f"{cmd.keyword.upper()} isn't allowed as an ONBUILD trigger", location=loc
            )
        return cmd

    def _from_ref(self, ref: str, cmd: ins.Instruction) -> str:
        # BuildKit refuses variables in --from: the value must not change when expanded.
        try:
            expanded = self.lex.process_word(ref, {})
        except ShellError as e:
            raise DockerfileError(str(e), location=cmd.location) from None
        if expanded != ref:
            raise DockerfileError(
                "variable expansion is not supported for --from, define a new stage with FROM "
                "using ARG from global scope as a workaround",
                location=cmd.location,
            )
        return ref

    def _deps(self, stage: StageState) -> list[StageState]:
        deps = []
        base = self._base(stage)
        if isinstance(base, StageState):
            deps.append(base)
        for cmd in self._commands(stage):
            for ref in cmd.from_refs:
                ref = self._from_ref(ref, cmd)
                try:
                    dep = stage_by_ref(self.stages, ref)
                except DockerfileError as err:
                    raise DockerfileError(err.message, location=cmd.location) from None
                if dep is not None and self.resolve_named(ref) is None:
                    deps.append(dep)
        return deps

    def _reachable(self, targets: list[StageState]) -> list[StageState]:
        """The stages the targets need, in Dockerfile order (BuildKit dispatches in file
        order, which is why a COPY --from can only name a stage above it)."""
        seen: dict[int, StageState] = {}
        todo = list(targets)
        while todo:
            st = todo.pop()
            if st.spec.index in seen:
                continue
            seen[st.spec.index] = st
            todo.extend(self._deps(st))
        return [seen[i] for i in sorted(seen)]

    # -- conversion ----------------------------------------------------------------------

    def run(self) -> Definition:
        target = target_stage(self.stages, self.opts.target)
        check_cycles(self.stages, self.lex, self.global_args)
        targets = self.stages if self.opts.all_stages else [target]
        for stage in self._reachable(targets):
            self._convert_stage(stage)
        unused = sorted(
            k
            for k in self.opts.build_args
            if k not in self.used_args and k not in PROXY_ARGS and k not in BUILDKIT_ARGS
        )
        self.linter.warnings.sort(key=lambda w: w.location.start_line if w.location else 0)
        warnings = [f"WARNING: {w.short()}" for w in self.linter.warnings]
        if unused:
            warnings.append(
                f"WARNING: One or more build-args [{' '.join(unused)}] were not consumed"
            )
        error = self.linter.error()
        if error is not None:
            raise error
        config = dict(target.config)
        if not config.get("OnBuild"):
            config.pop("OnBuild", None)
        labels = dict(config.get("Labels") or {})
        labels.update(self.opts.labels)
        if labels or "Labels" in config:
            config["Labels"] = labels
        os_, arch, variant = platforms.split(target.platform or self.opts.platform)
        image: dict[str, Any] = {"architecture": arch, "os": os_}
        if variant:
            image["variant"] = variant
        image.update(target.image)
        _set_platform(image, self.opts.platform if self.opts.explicit_platform else None)
        image["config"] = config
        image["rootfs"] = {"type": "layers", "diff_ids": []}
        image["history"] = target.history
        return Definition(
            target.state,
            image,
            list(target.history_ops),
            warnings,
            list(self.linter.warnings),
            self._stage_ops(),
        )

    def _stage_ops(self) -> dict[str, tuple[llb.Op, ...]]:
        out: dict[str, tuple[llb.Op, ...]] = {}
        for stage in self.stages:
            ops = tuple(stage.ops)
            out[str(stage.spec.index)] = ops
            if stage.spec.name:  # a repeated name stands for all its stages
                out[stage.spec.name] = out.get(stage.spec.name, ()) + ops
        return out

    def step_name(
        self, stage: StageState, text: str, onbuild: bool = False, from_step: bool = False
    ) -> str:
        """BuildKit's progress name: `[stage 2/5] RUN ...` (no stage in a one-stage file);
        with several platforms (MultiPlatformRequested), the stage's platform first."""
        if stage.step_total == 0:
            return text
        stage.step_index += 1
        prefix = "" if len(self.stages) == 1 else stage.display_name + " "
        if self.opts.multi_platform:
            # BuildKit names a FROM with no environment (emptyEnvs): never a `->` target.
            env = {} if from_step else stage.env
            prefix = stage.platform + _target_suffix(stage.platform, env) + " " + prefix
        width = len(str(stage.step_total))
        out = f"[{prefix}{stage.step_index:>{width}}/{stage.step_total}] "
        return out + ("ONBUILD " if onbuild else "") + text

    def _from_platform(self, stage: StageState) -> str:
        """FROM --platform, expanded with the global ARGs and normalised ("" if none)."""
        spec = stage.spec
        if not spec.platform:
            return ""
        value = self.expand(spec.platform, defined(self.global_args), spec.location)
        if value == "":
            raise DockerfileError(
                f"empty platform value from expression {spec.platform}", location=spec.location
            )
        try:
            return platforms.normalize(value)
        except DockbuildError as e:
            raise DockerfileError(
                f"FROM --platform={value}: {e.message}", hint=e.hint, location=spec.location
            ) from None

    def _convert_stage(self, stage: StageState) -> None:
        base = self._base(stage)
        commands = self._commands(stage)
        stage.step_total = (1 if isinstance(base, NamedSource) else 0) + sum(
            isinstance(c, _COUNTED_STEPS) for c in commands
        )
        if isinstance(base, StageState):
            stage.state = base.state
            stage.config = _copy_json(base.config)
            stage.config.pop("OnBuild", None)  # triggers do not carry over from a stage
            stage.image = _copy_json(base.image)
            stage.history = list(base.history)  # entries are never changed once written
            stage.history_ops = list(base.history_ops)
            stage.args = dict(base.args)
            stage.env = dict(base.env)
            stage.env_pairs = dict(base.env_pairs)
            stage.arg_pairs = dict(base.arg_pairs)
            stage.workdir_set = base.workdir_set
        elif base is None:
            # BuildKit's emptyImage: scratch starts with WorkingDir "/" and the default PATH.
            stage.config = {"Env": [DEFAULT_PATH], "WorkingDir": "/"}
        else:
            stage.state = llb.SourceOp(
                base.identifier,
                platform=stage.platform,
                name=self.step_name(stage, f"FROM {base.name}", from_step=True),
            )
            self._from_image(stage, base.config or {})
        env_list = stage.config.setdefault("Env", []) or []
        stage.config["Env"] = env_list
        if not any(e.partition("=")[0] == "PATH" for e in env_list):
            env_list.append(DEFAULT_PATH)
        if not isinstance(base, StageState):
            for item in env_list:
                key, _, value = item.partition("=")
                stage.assign_env(key, value)
        for index, cmd in enumerate(commands):
            self._dispatch(stage, cmd, onbuild=index < stage.triggers)
        stage.done = True

    def _from_image(self, stage: StageState, config: dict[str, Any]) -> None:
        stage.config = _copy_json(config.get("config") or {})
        stage.config.pop("OnBuild", None)  # run now, then cleared
        for key, value in config.items():
            if key not in ("config", "rootfs", "history", "created"):
                stage.image[key] = _copy_json(value)
        stage.history = list(config.get("history") or [])
        stage.history_ops = [None] * len(stage.history)

    def commit(self, stage: StageState, created_by: str, op: llb.Op | None = None) -> None:
        """Record a history entry; `op` is the step whose layer it describes (and one of
        the stage's own ops)."""
        entry: dict[str, Any] = {"created_by": created_by, "comment": "buildkit.dockerfile.v0"}
        if op is None:
            entry["empty_layer"] = True
        else:
            stage.ops.append(op)
        stage.history.append(entry)
        stage.history_ops.append(op)

    def _dispatch(self, stage: StageState, cmd: ins.Instruction, onbuild: bool = False) -> None:
        handler = HANDLERS.get(type(cmd))
        if handler is None:
            raise DockerfileError(
                f"{cmd.keyword.upper()} is not supported yet", location=cmd.location
            )
        for from_ in cmd.from_refs:
            if "$" in from_ or self.resolve_named(from_) is not None:
                continue
            try:
                dep = stage_by_ref(self.stages, from_)
            except DockerfileError as err:
                raise DockerfileError(err.message, location=cmd.location) from None
            if dep is not None and dep is not stage and not dep.done:
                raise DockerfileError(
                    f'cannot copy from stage "{from_}", it needs to be defined before current '
                    f'stage "{stage.display_name}"',
                    location=cmd.location,
                )
        name = ""  # the progress name, for the instructions that are steps
        if isinstance(cmd, _COUNTED_STEPS):
            name = " ".join(cmd.original.split())
            if isinstance(cmd, ins.RunCommand) and cmd.single_heredoc is not None:
                # BuildKit names the step after the heredoc's first line: RUN <<EOF (apt-get...)
                lines = cmd.files[0].data.strip().replace("\r\n", "\n").split("\n")
                name += f" ({lines[0]}{'...' if len(lines) > 1 else ''})"
            if not isinstance(cmd, ins.WorkdirCommand):
                name = self.step_name(stage, upper_first(name), onbuild)
        self.onbuild = onbuild
        self.current = stage
        try:
            handler(self, stage, cmd, name)
        except DockerfileError as err:
            if err.location is None:
                err.location = cmd.location
            raise
        finally:
            self.current = None


# -- helpers -------------------------------------------------------------------------------


def _copy_json(value: Any) -> Any:
    """A deep copy of JSON data (dicts, lists, scalars), much faster than copy.deepcopy."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value


def _set_platform(image: dict[str, Any], asked: str | None) -> None:
    """The image config's platform as BuildKit's dispatch ends: the platform asked for
    (--platform) replaces the base's OS and architecture, and its variant and OS version
    too unless the base has the same OS and architecture and the asked one names none (a
    base of another platform keeps its own without --platform); then containerd's
    normalisation (``aarch64`` -> ``arm64``, ``arm64/v8`` -> ``arm64``)."""
    if asked is not None:
        os_, arch, variant = platforms.split(asked)
        same = (image.get("os"), image.get("architecture")) == (os_, arch)
        image.update(os=os_, architecture=arch)
        if variant or not same:
            image.pop("variant", None)
            if variant:
                image["variant"] = variant
        if not same:
            image.pop("os.version", None)
    if image.get("os") and image.get("architecture"):
        arch, variant = platforms.normalize_arch(str(image["architecture"]), str(image.get("variant") or ""))
        image["os"] = str(image["os"]).lower()
        image["architecture"] = arch
        image.pop("variant", None)
        if variant:
            image["variant"] = variant
    if image.get("os.features"):
        image["os.features"] = sorted(set(image["os.features"]))


def _target_suffix(platform: str, env: dict[str, str]) -> str:
    """BuildKit's formatTargetPlatform over platformFromEnv: the target a step names in its
    environment (TARGETPLATFORM, or TARGETOS/TARGETARCH/TARGETVARIANT, as ARG or ENV) when
    it differs from the step's own platform: `->arm64`, `->arm/v7`, or the whole platform
    for another OS. A step whose stage declares none of them gets none."""
    os_, arch, _ = platforms.split(platform)
    target: tuple[str, str, str] | None = None
    parts = {"TARGETOS": "", "TARGETARCH": "", "TARGETVARIANT": ""}
    named = False
    for key, value in env.items():
        if key == "TARGETPLATFORM":
            try:
                parsed = platforms.parse(value)
            except DockbuildError:
                continue
            target = (parsed.os, parsed.architecture, parsed.variant)
            break
        if key in parts:
            parts[key] = value
            named = True
    if target is None:
        if not named:
            return ""
        target = (parts["TARGETOS"], parts["TARGETARCH"], parts["TARGETVARIANT"])
    wanted = platforms.normalized(
        platforms.Platform(target[0] or os_, target[1] or arch, target[2])
    )
    if wanted.os == os_ and wanted.architecture != arch:
        return "->" + "/".join(p for p in (wanted.architecture, wanted.variant) if p)
    if wanted.os != os_:
        return "->" + str(wanted)
    return ""
