"""Dockerfile -> LLB: stages, ARG scoping, ONBUILD, the image config and history, as
BuildKit's dockerfile2llb builds them.

Pure: the only way out is the two resolver callbacks the caller passes in (a named
context or a registry image -> a pinned identifier and its config), so this module runs
without a container runtime, a registry or a cache.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dockbuild import llb
from dockbuild.errors import DockerfileError, Location
from dockbuild.frontend import checks, parser
from dockbuild.frontend import instructions as ins
from dockbuild.frontend.convert_copy import CopyInstructions
from dockbuild.frontend.convert_run import DEFAULT_SHELL, PROXY_ARGS, RunInstructions
from dockbuild.frontend.shell import Lex, ShellError

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
_NON_ENV_ARGS = {"BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"}
# The instructions BuildKit numbers in progress names ([stage 2/5] ...), besides FROM.
_COUNTED_STEPS = (ins.AddCommand, ins.CopyCommand, ins.RunCommand, ins.WorkdirCommand)
_KEY_VALUE_COMMANDS = (ins.EnvCommand, ins.LabelCommand)


@dataclass(frozen=True)
class NamedSource:
    """What a FROM / --from name stands for outside the Dockerfile."""

    kind: str  # "image" | "local"
    identifier: str  # a pinned SourceOp identifier
    config: dict | None  # the image config (images only)
    name: str  # how progress shows it


@dataclass
class ConvertOptions:
    target: str | None = None
    build_args: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    platform: str = "linux/amd64"
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


ResolveNamed = Callable[[str], NamedSource | None]
ResolveImage = Callable[[str], NamedSource]


@dataclass
class _Stage:
    """A stage while it is being converted."""

    spec: ins.Stage
    state: llb.Op | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the image config's "config"
    image: dict[str, Any] = field(default_factory=dict)  # top-level fields (author, ...)
    history: list[dict[str, Any]] = field(default_factory=list)
    history_ops: list[llb.Op | None] = field(default_factory=list)
    args: dict[str, str | None] = field(default_factory=dict)  # ARGs in scope, in order
    # BuildKit's state env (llb EnvList): the base image's Env, then every ENV and every
    # ARG with a value, the latest assignment of a key winning and moving it to the end.
    # It is the expansion scope and RUN's environment.
    env: dict[str, str] = field(default_factory=dict)
    env_pairs: dict[str, str] = field(default_factory=dict)  # key -> "k=v", as `env`
    # The `|N K=v ...` of RUN history (runCommandString): every ARG in scope, in the
    # order first declared, showing the key's env value, else the ARG's own ("" unset).
    arg_pairs: dict[str, str] = field(default_factory=dict)
    run_env: tuple[str, ...] | None = None  # tuple(env_pairs.values()), until env changes
    cmd_set: bool = False
    done: bool = False
    # The resolved base: ("stage", _Stage) | ("scratch", None) | ("image", NamedSource).
    base: tuple[str, Any] | None = None
    commands: list[ins.Instruction] | None = None  # ONBUILD triggers + the stage's own
    triggers: int = 0  # how many of `commands` are triggers of the base
    step_total: int = 0
    step_index: int = 0
    workdir_set: bool = False
    used_once: dict[str, Location] = field(default_factory=dict)
    env_index: dict[str, int] | None = None  # config Env key -> position, kept by ENV

    @property
    def display_name(self) -> str:
        return self.spec.name or f"stage-{self.spec.index}"


def dockerfile_to_llb(
    text: bytes | str,
    options: ConvertOptions,
    resolve_named: ResolveNamed,
    resolve_image: ResolveImage,
) -> Definition:
    return _Converter(text, options, resolve_named, resolve_image).run()


class _Converter(RunInstructions, CopyInstructions):
    def __init__(
        self,
        text: bytes | str,
        options: ConvertOptions,
        resolve_named: ResolveNamed,
        resolve_image: ResolveImage,
    ) -> None:
        self.opts = options
        self._current: tuple[_Stage, ins.Instruction] | None = None
        self._onbuild = False
        self.resolve_named = resolve_named
        self.resolve_image = resolve_image
        # keyword -> the `_do_<keyword>` function (FROM has none: stages are not dispatched);
        # unbound, so that the converter holds no reference cycle to itself.
        self._handlers: dict[str, Callable[[Any, _Stage, Any, str], None]] = {
            name: getattr(type(self), "_do_" + name)
            for name in parser.INSTRUCTION_NAMES
            if hasattr(type(self), "_do_" + name)
        }
        if not text:
            raise DockerfileError(
                "the Dockerfile cannot be empty", location=Location(options.dockerfile_name, 1, 1)
            )
        self.result = parser.parse(text, filename=options.dockerfile_name)
        self.lex = Lex(self.result.escape_token)
        self.linter = checks.Linter(self._check_config(text))
        for w in self.result.warnings:
            if w.rule == "NoEmptyContinuation":
                self.linter.run(w.rule, "Empty continuation line", self._loc(w.line))
        specs, meta_args = ins.parse_stages(self.result)
        if not specs:
            raise DockerfileError(
                "dockerfile contains no stages to build",
                location=meta_args[0].location if meta_args else self._loc(1),
            )
        self.stages = [_Stage(spec) for spec in specs]
        self._static_checks()
        self.used_args: set[str] = set()
        self.meta_arg_names = {key for cmd in meta_args for key, _ in cmd.args}
        self.global_args = self._global_args(meta_args)
        self.context = llb.SourceOp(
            "local://context",
            attrs=(("exclude", "\n".join(options.exclude_patterns)),)
            if options.exclude_patterns
            else (),
            name="[internal] load build context",
        )

    def _loc(self, line: int) -> Location:
        return Location(self.opts.dockerfile_name, line, line)

    def _check_config(self, text: bytes | str) -> Any:
        line = 0
        if "check" in self.result.directives:
            raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
            for number, item in enumerate(raw.splitlines(), start=1):
                if re.match(r"\ufeff?#\s*check\s*=", item, re.IGNORECASE):
                    line = number
                    break
        return checks.check_config(
            self.result.directives.get("check"),
            self.opts.build_args.get("BUILDKIT_DOCKERFILE_CHECK"),
            self.opts.dockerfile_name,
            line,
        )

    def _static_checks(self) -> None:
        keyword = checks.keyword
        words: list[tuple[str, Location]] = []
        names: list[tuple[str, Location]] = []
        for stage in self.stages:
            spec = stage.spec
            words.append((checks.keyword(spec.original), spec.location))
            names.append((spec.name, spec.location))
            checks.check_from(spec.original, spec.location, self.linter)
            for cmd in spec.commands:
                words.append((keyword(cmd.original), cmd.location))
                if isinstance(cmd, ins.MaintainerCommand):
                    self.linter.run(
                        "MaintainerDeprecated",
                        "Maintainer instruction is deprecated in favor of using label",
                        cmd.location,
                    )
                elif isinstance(cmd, _KEY_VALUE_COMMANDS) and cmd.legacy:
                    word = keyword(cmd.original)
                    self.linter.run(
                        "LegacyKeyValueFormat",
                        f'"{word} key=value" should be used instead of legacy "{word} key value" format',
                        cmd.location,
                    )
        checks.check_casing(words, self.linter)
        checks.check_stage_names(names, self.linter)
        if self.linter.enabled("InvalidDefinitionDescription"):
            for node in self.result.children:
                if node.value == "from" and len(node.args) == 3 and node.args[1].lower() == "as":
                    word, keys = "FROM", [node.args[2].lower()]
                elif node.value == "arg":
                    word, keys = "ARG", [arg.partition("=")[0] for arg in node.args]
                else:
                    continue
                location = Location(self.opts.dockerfile_name, node.start_line, node.end_line)
                checks.check_definition_description(
                    word, keys, node.prev_comment, location, self.linter
                )

    # -- scopes ------------------------------------------------------------------------

    def _platform_args(self) -> dict[str, str]:
        os_, _, rest = self.opts.platform.partition("/")
        arch, _, variant = rest.partition("/")
        out = {}
        for prefix in ("BUILD", "TARGET"):
            out[f"{prefix}PLATFORM"] = self.opts.platform
            out[f"{prefix}OS"] = os_
            out[f"{prefix}OSVERSION"] = ""
            out[f"{prefix}ARCH"] = arch
            out[f"{prefix}VARIANT"] = variant
        return out

    def _global_args(self, meta_args: list[ins.ArgCommand]) -> dict[str, str | None]:
        scope: dict[str, str | None] = dict(self._platform_args())
        target = self._target_stage()
        scope["TARGETSTAGE"] = target.spec.name or ""
        defaults = dict(scope)
        for cmd in meta_args:
            for key, default in cmd.args:
                checks.check_secret_name("ARG", key, cmd.location, self.linter)
                if default is not None:
                    try:
                        defaults[key] = self.lex.process_word(default, _defined(defaults))
                    except ShellError:
                        defaults[key] = None
                elif key not in defaults:
                    defaults[key] = None
                if key in self.opts.build_args:
                    scope[key] = self.opts.build_args[key]
                    self.used_args.add(key)
                elif default is not None:
                    scope[key] = self._expand(default, _defined(scope), cmd.location)
                else:
                    scope[key] = None
        self._from_checks(defaults)
        return scope

    def _from_checks(self, defaults: dict[str, str | None]) -> None:
        """UndefinedArgInFrom and InvalidDefaultArgInFrom, from the defaults alone."""
        declared = sorted(set(defaults) | self.meta_arg_names)
        for stage in self.stages:
            spec = stage.spec
            for word in (spec.base_name, spec.platform):
                if not word:
                    continue
                try:
                    _, _, unmatched = self.lex.process_word_with_matches(word, _defined(defaults))
                except ShellError:
                    continue
                for name in sorted(unmatched):
                    if name in declared:
                        continue
                    match = checks.suggest(name, declared)
                    message = f"FROM argument '{name}' is not declared"
                    if match:
                        message += f" (did you mean {match}?)"
                    self.linter.run("UndefinedArgInFrom", message, spec.location)
            try:
                base = self.lex.process_word(spec.base_name, _defined(defaults))
            except ShellError:
                continue
            if "$" in spec.base_name and not _valid_reference(base):
                self.linter.run(
                    "InvalidDefaultArgInFrom",
                    f"Default value for ARG {spec.base_name} results in empty or invalid base "
                    "image name",
                    spec.location,
                )
            if spec.platform:
                self._platform_checks(spec, defaults)

    def _platform_checks(self, spec: ins.Stage, defaults: dict[str, str | None]) -> None:
        try:
            _, matched, _ = self.lex.process_word_with_matches(spec.platform, _defined(defaults))
        except ShellError:
            return
        if spec.platform in ("$TARGETPLATFORM", "${TARGETPLATFORM}"):
            self.linter.run(
                "RedundantTargetPlatform",
                f"Setting platform to predefined {spec.platform} in FROM is redundant as this is "
                "the default behavior",
                spec.location,
            )
        if not matched and "$" not in spec.platform:
            # A stage named after its platform (`AS build-arm64`) is allowed a constant.
            os_, _, rest = spec.platform.partition("/")
            arch = rest.partition("/")[0]
            if not (spec.name and ((arch and arch in spec.name) or (os_ and os_ in spec.name))):
                self.linter.run(
                    "FromPlatformFlagConstDisallowed",
                    f'FROM --platform flag should not use constant value "{spec.platform}"',
                    spec.location,
                )

    def _expand(self, word: str, env: dict[str, str], location: Location) -> str:
        if self.lex.is_plain(word):
            return word
        try:
            if self._current is None:
                return self.lex.process_word(word, env)
            result, _, unmatched = self.lex.process_word_with_matches(word, env)
        except ShellError as e:
            raise DockerfileError(str(e), location=location) from None
        if unmatched:
            self._report_undefined(unmatched, env, location)
        return result

    def _expand_words(self, word: str, env: dict[str, str], location: Location) -> list[str]:
        try:
            return self.lex.process_words(word, env)
        except ShellError as e:
            raise DockerfileError(str(e), location=location) from None

    def _report_undefined(self, names: set[str], env: dict[str, str], location: Location) -> None:
        assert self._current is not None
        stage = self._current[0]
        for name in sorted(names):
            if name in stage.args or name in _NON_ENV_ARGS:
                continue
            match = checks.suggest(name, list(env))
            message = f"Usage of undefined variable '${name}'"
            if match:
                message += f" (did you mean ${match}?)"
            self.linter.run("UndefinedVar", message, location)

    @staticmethod
    def _stage_env(stage: _Stage) -> dict[str, str]:
        """Expansion scope inside a stage: the image's ENV, then each ARG and ENV in order.
        The stage's own dict, not a copy: callers only read it."""
        return stage.env

    @staticmethod
    def _assign_env(stage: _Stage, key: str, value: str) -> None:
        """EnvList.AddOrReplace on the stage's env: the key moves to the end."""
        pair = f"{key}={value}"
        if key in stage.env:
            del stage.env[key], stage.env_pairs[key]
        stage.env[key] = value
        stage.env_pairs[key] = pair
        if key in stage.arg_pairs:
            stage.arg_pairs[key] = pair
        stage.run_env = None

    # -- stage graph -------------------------------------------------------------------

    def _target_stage(self) -> _Stage:
        if self.opts.target is None:
            return self.stages[-1]
        found = self._stage_by_name(self.opts.target)
        if found is None:
            names = [st.spec.name for st in self.stages if st.spec.name]
            match = checks.suggest(self.opts.target.lower(), names)
            hint = f" (did you mean {match}?)" if match else ""
            raise DockerfileError(f'target stage "{self.opts.target}" could not be found{hint}')
        return found

    def _stage_by_name(self, name: str, before: int | None = None) -> _Stage | None:
        """A stage by its (case-insensitive) name; with `before`, only earlier stages
        (FROM sees only the stages above it). A repeated name means the last one."""
        low = name.lower()
        found = None
        for st in self.stages:
            if before is not None and st.spec.index >= before:
                break
            if st.spec.name and st.spec.name == low:
                found = st
        return found

    def _stage_by_ref(self, ref: str) -> _Stage | None:
        """--from names a stage by name or by index."""
        if ref.isdigit():
            index = int(ref)
            if index >= len(self.stages):
                raise DockerfileError(f"invalid stage index {index}")
            return self.stages[index]
        return self._stage_by_name(ref)

    def _base_name(self, stage: _Stage) -> str:
        spec = stage.spec
        name = self._expand(spec.base_name, _defined(self.global_args), spec.location)
        if name == "":
            raise DockerfileError(
                f"base name ({spec.base_name}) should not be blank", location=spec.location
            )
        return name

    def _base(self, stage: _Stage) -> tuple[str, Any]:
        """What a stage starts from: an earlier stage, scratch or an image (resolved once)."""
        if stage.base is not None:
            return stage.base
        spec = stage.spec
        named = self.resolve_named(spec.name) if spec.name and spec.name != "context" else None
        if named is not None:
            # A named context with the stage's name replaces the stage.
            stage.base = ("image", self._image_source(named, spec))
            stage.commands = []
            return stage.base
        base_name = self._base_name(stage)
        earlier = self._stage_by_name(base_name, before=spec.index)
        if earlier is not None:
            stage.base = ("stage", earlier)
        elif base_name == "scratch":
            stage.base = ("scratch", None)
        else:
            named = self.resolve_named(base_name) if base_name != "context" else None
            if named is None:
                named = self.resolve_image(base_name)
            stage.base = ("image", self._image_source(named, spec))
        return stage.base

    def _image_source(self, named: NamedSource, spec: ins.Stage) -> NamedSource:
        if named.kind != "image":
            raise DockerfileError(
                f"FROM {spec.base_name}: a local directory context cannot be a base image",
                location=spec.location,
            )
        return named

    def _commands(self, stage: _Stage) -> list[ins.Instruction]:
        """The stage's instructions, after the ONBUILD triggers of its base."""
        if stage.commands is not None:
            return stage.commands
        kind, base = self._base(stage)
        if stage.commands is not None:  # replaced by a named context
            return stage.commands
        expressions: list[str] = []
        if kind == "stage":
            expressions = [
                c.expression for c in base.spec.commands if isinstance(c, ins.OnbuildCommand)
            ]
        elif kind == "image":
            expressions = list(((base.config or {}).get("config") or {}).get("OnBuild") or [])
        triggers = [self._trigger(expr, stage) for expr in expressions]
        stage.triggers = len(triggers)
        stage.commands = [*triggers, *stage.spec.commands]
        return stage.commands

    def _trigger(self, expression: str, stage: _Stage) -> ins.Instruction:
        loc = stage.spec.location
        try:
            result = parser.parse(expression, filename=self.opts.dockerfile_name)
            if len(result.children) != 1:
                raise DockerfileError("onbuild trigger should be a single expression")
            node = result.children[0]
            node.start_line, node.end_line = loc.start_line, loc.end_line or loc.start_line
            cmd = ins.parse_instruction(node, self.opts.dockerfile_name)
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

    def _deps(self, stage: _Stage) -> list[_Stage]:
        deps = []
        kind, base = self._base(stage)
        if kind == "stage":
            deps.append(base)
        for cmd in self._commands(stage):
            for ref in cmd.from_refs:
                ref = self._from_ref(ref, cmd)
                try:
                    dep = self._stage_by_ref(ref)
                except DockerfileError as err:
                    raise DockerfileError(err.message, location=cmd.location) from None
                if dep is not None and self.resolve_named(ref) is None:
                    deps.append(dep)
        return deps

    def _check_cycles(self) -> None:
        """Any cycle among the stages is an error, used or not (validateCircularDependency)."""
        edges: dict[int, list[int]] = {}
        for st in self.stages:
            targets = []
            earlier = None
            try:
                name = self.lex.process_word(st.spec.base_name, _defined(self.global_args))
                earlier = self._stage_by_name(name, before=st.spec.index)
            except ShellError:
                pass
            if earlier is not None:
                targets.append(earlier.spec.index)
            for cmd in st.spec.commands:
                for ref in cmd.from_refs:
                    if "$" in ref:
                        continue
                    try:
                        dep = self._stage_by_ref(ref)
                    except DockerfileError:
                        continue
                    if dep is not None:
                        targets.append(dep.spec.index)
            edges[st.spec.index] = targets
        state: dict[int, str] = {}

        def visit(index: int) -> bool:
            mark = state.get(index)
            if mark == "done":
                return False
            if mark == "active":
                return True
            state[index] = "active"
            if any(visit(t) for t in edges[index]):
                return True
            state[index] = "done"
            return False

        for st in self.stages:
            if visit(st.spec.index):
                raise DockerfileError(
                    f"circular dependency detected on stage: {st.display_name}",
                    location=st.spec.location,
                )

    def _reachable(self, targets: list[_Stage]) -> list[_Stage]:
        """The stages the targets need, in Dockerfile order (BuildKit dispatches in file
        order, which is why a COPY --from can only name a stage above it)."""
        seen: dict[int, _Stage] = {}
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
        target = self._target_stage()
        self._check_cycles()
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
        os_, _, rest = self.opts.platform.partition("/")
        arch, _, variant = rest.partition("/")
        image: dict[str, Any] = {"architecture": arch, "os": os_}
        if variant:
            image["variant"] = variant
        image.update(target.image)
        image["config"] = config
        image["rootfs"] = {"type": "layers", "diff_ids": []}
        image["history"] = target.history
        return Definition(
            target.state, image, list(target.history_ops), warnings, list(self.linter.warnings)
        )

    def _step_name(self, stage: _Stage, text: str, onbuild: bool = False) -> str:
        """BuildKit's progress name: `[stage 2/5] RUN ...` (no stage in a one-stage file)."""
        if stage.step_total == 0:
            return text
        stage.step_index += 1
        prefix = "" if len(self.stages) == 1 else stage.display_name + " "
        width = len(str(stage.step_total))
        out = f"[{prefix}{stage.step_index:>{width}}/{stage.step_total}] "
        return out + ("ONBUILD " if onbuild else "") + text

    def _check_platform(self, stage: _Stage) -> None:
        """FROM --platform: expanded with the global ARGs; dockbuild builds for one
        platform, so any other value is refused here rather than pulled and run wrongly."""
        spec = stage.spec
        if not spec.platform:
            return
        value = self._expand(spec.platform, _defined(self.global_args), spec.location)
        if value == "":
            raise DockerfileError(
                f"empty platform value from expression {spec.platform}", location=spec.location
            )
        if _normalize_platform(value) != _normalize_platform(self.opts.platform):
            raise DockerfileError(
                f"FROM --platform={value}: dockbuild builds for {self.opts.platform} only",
                hint="drop --platform, or use $BUILDPLATFORM / $TARGETPLATFORM",
                location=spec.location,
            )

    def _convert_stage(self, stage: _Stage) -> None:
        self._check_platform(stage)
        kind, base = self._base(stage)
        commands = self._commands(stage)
        stage.step_total = (1 if kind == "image" else 0) + sum(
            isinstance(c, _COUNTED_STEPS) for c in commands
        )
        if kind == "stage":
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
        elif kind == "scratch":
            stage.config = {"Env": [DEFAULT_PATH]}
        else:
            stage.state = llb.SourceOp(
                base.identifier,
                platform=self.opts.platform,
                name=self._step_name(stage, f"FROM {base.name}"),
            )
            self._from_image(stage, base.config or {})
        env_list = stage.config.setdefault("Env", []) or []
        stage.config["Env"] = env_list
        if not any(e.partition("=")[0] == "PATH" for e in env_list):
            env_list.append(DEFAULT_PATH)
        if kind != "stage":
            for item in env_list:
                key, _, value = item.partition("=")
                self._assign_env(stage, key, value)
        for index, cmd in enumerate(commands):
            self._dispatch(stage, cmd, onbuild=index < stage.triggers)
        stage.done = True

    def _from_image(self, stage: _Stage, config: dict[str, Any]) -> None:
        stage.config = _copy_json(config.get("config") or {})
        stage.config.pop("OnBuild", None)  # run now, then cleared
        for key, value in config.items():
            if key not in ("config", "rootfs", "history", "created"):
                stage.image[key] = _copy_json(value)
        stage.history = list(config.get("history") or [])
        stage.history_ops = [None] * len(stage.history)

    def _commit(self, stage: _Stage, created_by: str, op: llb.Op | None = None) -> None:
        """Record a history entry; ``op`` is the step whose layer it describes."""
        entry: dict[str, Any] = {"created_by": created_by, "comment": "buildkit.dockerfile.v0"}
        if op is None:
            entry["empty_layer"] = True
        stage.history.append(entry)
        stage.history_ops.append(op)

    def _dispatch(self, stage: _Stage, cmd: ins.Instruction, onbuild: bool = False) -> None:
        handler = self._handlers.get(cmd.keyword)
        if handler is None:
            raise DockerfileError(
                f"{cmd.keyword.upper()} is not supported yet", location=cmd.location
            )
        for from_ in cmd.from_refs:
            if "$" in from_ or self.resolve_named(from_) is not None:
                continue
            try:
                dep = self._stage_by_ref(from_)
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
                name = self._step_name(stage, _upper_first(name), onbuild)
        self._onbuild = onbuild
        self._current = (stage, cmd)
        try:
            handler(self, stage, cmd, name)
        except DockerfileError as err:
            if err.location is None:
                err.location = cmd.location
            raise
        finally:
            self._current = None

    # -- metadata instructions ----------------------------------------------------------

    def _do_env(self, stage: _Stage, cmd: ins.EnvCommand, name: str) -> None:
        env = self._stage_env(stage)  # every pair sees the values from before this ENV
        pairs = [
            (self._expand(k, env, cmd.location), self._expand(v, env, cmd.location))
            for k, v in cmd.env
        ]
        current = stage.config.setdefault("Env", [])
        index = stage.env_index
        if index is None or len(index) != len(current):
            index = {item.partition("=")[0]: i for i, item in enumerate(current)}
            stage.env_index = index
        for key, value in pairs:
            checks.check_secret_name("ENV", key, cmd.location, self.linter)
            if key in index:
                current[index[key]] = f"{key}={value}"
            else:
                index[key] = len(current)
                current.append(f"{key}={value}")
            self._assign_env(stage, key, value)
        self._commit(stage, "ENV " + " ".join(f"{k}={v}" for k, v in pairs))

    def _do_arg(self, stage: _Stage, cmd: ins.ArgCommand, name: str) -> None:
        parts = []
        for key, default in cmd.args:
            checks.check_secret_name("ARG", key, cmd.location, self.linter)
            if key in self.opts.build_args:
                value: str | None = self.opts.build_args[key]
                self.used_args.add(key)
            elif default is not None:
                value = self._expand(default, self._stage_env(stage), cmd.location)
            elif key in self.global_args:
                value = self.global_args[key]
            else:
                value = None
            stage.args[key] = value
            if value is not None and key not in _NON_ENV_ARGS:
                self._assign_env(stage, key, value)
            shown = stage.env.get(key, value or "")
            stage.arg_pairs[key] = f"{key}={shown}"
            parts.append(key if value is None else f"{key}={value}")
        self._commit(stage, "ARG " + " ".join(parts))

    def _do_label(self, stage: _Stage, cmd: ins.LabelCommand, name: str) -> None:
        env = self._stage_env(stage)
        labels = stage.config.setdefault("Labels", {}) or {}
        stage.config["Labels"] = labels
        shown = []
        for k, v in cmd.labels:
            key, value = self._expand(k, env, cmd.location), self._expand(v, env, cmd.location)
            labels[key] = value
            shown.append(f"{key}={value}")
        self._commit(stage, "LABEL " + " ".join(shown))

    def _do_maintainer(self, stage: _Stage, cmd: ins.MaintainerCommand, name: str) -> None:
        stage.image["author"] = cmd.maintainer
        self._commit(stage, f"MAINTAINER {cmd.maintainer}")

    def _do_user(self, stage: _Stage, cmd: ins.UserCommand, name: str) -> None:
        user = self._expand(cmd.user, self._stage_env(stage), cmd.location)
        stage.config["User"] = user
        self._commit(stage, f"USER {user}")

    def _command_args(self, stage: _Stage, cmd_line: list[str], prepend_shell: bool) -> list[str]:
        if prepend_shell:
            return [*(stage.config.get("Shell") or DEFAULT_SHELL), " ".join(cmd_line)]
        return list(cmd_line)

    def _used_once(self, stage: _Stage, cmd: ins.Instruction, word: str) -> None:
        """MultipleInstructionsDisallowed: the earlier instruction is the one reported."""
        earlier = stage.used_once.get(word)
        if earlier is not None:
            self.linter.run(
                "MultipleInstructionsDisallowed",
                f"Multiple {word} instructions should not be used in the same stage because "
                "only the last one will be used",
                earlier,
            )
        stage.used_once[word] = cmd.location

    def _json_args_check(self, stage: _Stage, cmd: ins.Instruction, word: str) -> None:
        if not stage.config.get("Shell"):
            self.linter.run(
                "JSONArgsRecommended",
                f"JSON arguments recommended for {word} to prevent unintended behavior related "
                "to OS signals",
                cmd.location,
            )

    def _do_cmd(self, stage: _Stage, cmd: ins.CmdCommand, name: str) -> None:
        self._used_once(stage, cmd, "CMD")
        if cmd.prepend_shell:
            self._json_args_check(stage, cmd, "CMD")
        args = self._command_args(stage, list(cmd.cmd_line), cmd.prepend_shell)
        stage.config["Cmd"] = args
        stage.config["ArgsEscaped"] = True  # BuildKit sets it for every CMD
        stage.cmd_set = True
        self._commit(stage, f"CMD {_go_quote_list(args)}")

    def _do_entrypoint(self, stage: _Stage, cmd: ins.EntrypointCommand, name: str) -> None:
        self._used_once(stage, cmd, "ENTRYPOINT")
        if cmd.prepend_shell:
            self._json_args_check(stage, cmd, "ENTRYPOINT")
        args = self._command_args(stage, list(cmd.cmd_line), cmd.prepend_shell)
        stage.config["Entrypoint"] = args
        if not stage.cmd_set:
            stage.config["Cmd"] = None
        self._commit(stage, f"ENTRYPOINT {_go_quote_list(args)}")

    def _do_shell(self, stage: _Stage, cmd: ins.ShellCommand, name: str) -> None:
        stage.config["Shell"] = list(cmd.shell)
        self._commit(stage, f"SHELL {_go_list(list(cmd.shell))}")

    def _do_expose(self, stage: _Stage, cmd: ins.ExposeCommand, name: str) -> None:
        env = self._stage_env(stage)
        ports = stage.config.setdefault("ExposedPorts", {}) or {}
        stage.config["ExposedPorts"] = ports
        added = []
        for raw in cmd.ports:
            for word in self._expand_words(raw, env, cmd.location):
                proto = word.partition("/")[2]
                if proto and proto.lower() != proto:
                    self.linter.run(
                        "ExposeProtoCasing",
                        f"Defined protocol '{word}' in EXPOSE instruction should be lowercase",
                        cmd.location,
                    )
                if ":" in word.partition("/")[0]:
                    self.linter.run(
                        "ExposeInvalidFormat",
                        f"EXPOSE instruction should not define an IP address or host-port "
                        f"mapping, found '{word}'",
                        cmd.location,
                    )
                for port in _expand_port(word, cmd.location):
                    ports[port] = {}
                    added.append(port)
        self._commit(stage, f"EXPOSE {_go_list(added)}")

    def _do_volume(self, stage: _Stage, cmd: ins.VolumeCommand, name: str) -> None:
        env = self._stage_env(stage)
        vols = stage.config.setdefault("Volumes", {}) or {}
        stage.config["Volumes"] = vols
        added = []
        for raw in cmd.volumes:
            v = self._expand(raw, env, cmd.location)
            if v == "":
                raise DockerfileError(
                    "VOLUME specified can not be an empty string", location=cmd.location
                )
            vols[v] = {}
            added.append(v)
        self._commit(stage, f"VOLUME {_go_list(added)}")

    def _do_stopsignal(self, stage: _Stage, cmd: ins.StopSignalCommand, name: str) -> None:
        sig = self._expand(cmd.signal, self._stage_env(stage), cmd.location)
        if not _valid_signal(sig):
            raise DockerfileError(f"Invalid signal: {sig}", location=cmd.location)
        stage.config["StopSignal"] = sig
        self._commit(stage, f"STOPSIGNAL {sig}")

    def _do_healthcheck(self, stage: _Stage, cmd: ins.HealthcheckCommand, name: str) -> None:
        self._used_once(stage, cmd, "HEALTHCHECK")
        health: dict[str, Any] = {"Test": list(cmd.test)}
        fields = (
            ("Interval", cmd.interval),
            ("Timeout", cmd.timeout),
            ("StartPeriod", cmd.start_period),
            ("StartInterval", cmd.start_interval),
        )
        for key, value in (*fields, ("Retries", cmd.retries)):
            if value:
                health[key] = value
        stage.config["Healthcheck"] = health
        # Go's %+v of the HealthcheckConfig struct, as BuildKit writes it.
        shown = " ".join(
            [f"Test:{_go_list(list(cmd.test))}"]
            + [f"{key}:{go_duration(value)}" for key, value in fields]
            + [f"Retries:{cmd.retries}"]
        )
        self._commit(stage, "HEALTHCHECK {" + shown + "}")

    def _do_onbuild(self, stage: _Stage, cmd: ins.OnbuildCommand, name: str) -> None:
        # Stored for the images built on this one; BuildKit writes no history entry.
        triggers = stage.config.setdefault("OnBuild", []) or []
        stage.config["OnBuild"] = triggers
        triggers.append(cmd.expression)

    # -- filesystem instructions -----------------------------------------------------------

    def _do_workdir(self, stage: _Stage, cmd: ins.WorkdirCommand, name: str) -> None:
        raw = self._expand(cmd.path, self._stage_env(stage), cmd.location)
        if not stage.workdir_set and not raw.startswith("/"):
            self.linter.run(
                "WorkdirRelativePath",
                f'Relative workdir "{raw}" can have unexpected results if the base image changes',
                cmd.location,
            )
        stage.workdir_set = True
        path = posixpath.normpath(posixpath.join(stage.config.get("WorkingDir") or "/", raw))
        if path.startswith("//"):
            path = "/" + path.lstrip("/")
        stage.config["WorkingDir"] = path
        if path == "/":
            self._commit(stage, "WORKDIR /")
            return
        name = self._step_name(stage, _upper_first(name), self._onbuild)
        # BuildKit creates the directory as the current USER (only new directories).
        user = stage.config.get("User") or ""
        owner = llb.Chown(*user.split(":", 1)) if user else None
        op = llb.FileOp(
            stage.state,
            (llb.Mkdir(path, 0o755, make_parents=True, chown=owner),),
            name=name,
            location=cmd.location,
        )
        stage.state = op
        self._commit(stage, f"WORKDIR {path}", op)


# -- helpers -------------------------------------------------------------------------------


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm"}


def _normalize_platform(text: str) -> str:
    """containerd's platforms.Normalize, enough for comparing with the build platform."""
    parts = text.lower().split("/")
    if len(parts) == 1:  # an architecture alone means this OS
        parts = ["linux", parts[0]]
    parts[1] = _ARCH_ALIASES.get(parts[1], parts[1])
    if parts[1] == "arm64" and parts[2:] == ["v8"]:
        parts = parts[:2]
    return "/".join(parts)


def _copy_json(value: Any) -> Any:
    """A deep copy of JSON data (dicts, lists, scalars), much faster than copy.deepcopy."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value


def _defined(scope: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in scope.items() if v is not None}


def _upper_first(text: str) -> str:
    word, sep, rest = text.partition(" ")
    return word.upper() + sep + rest


def _go_quote_list(items: list[str]) -> str:
    """Go's %q of a []string: ["a" "b"] (how BuildKit writes CMD/ENTRYPOINT history)."""
    return "[" + " ".join(parser.go_quote(i) for i in items) + "]"


def _go_list(items: list[str]) -> str:
    """Go's %v of a []string: [a b] (VOLUME, SHELL, EXPOSE history)."""
    return "[" + " ".join(items) + "]"


def go_duration(ns: int) -> str:
    """Go's time.Duration.String(): 0s, 500ms, 1.5s, 1m30s, 1h0m0s."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < 1_000:
        return f"{sign}{u}ns"
    if u < 1_000_000:
        return sign + _fraction(u, 1_000) + "\u00b5s"
    if u < 1_000_000_000:
        return sign + _fraction(u, 1_000_000) + "ms"
    seconds = _fraction(u % 60_000_000_000, 1_000_000_000) + "s"
    minutes_total = u // 60_000_000_000
    hours, minutes = divmod(minutes_total, 60)
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return sign + seconds


def _fraction(value: int, unit: int) -> str:
    whole, rest = divmod(value, unit)
    if not rest:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}." + f"{rest:0{digits}d}".rstrip("0")


_SIGNALS = {
    "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
    "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
    "TRAP", "TSTP", "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ",
    "RTMIN", "RTMAX", "UNUSED",
    *(f"RTMIN+{n}" for n in range(1, 16)),
    *(f"RTMAX-{n}" for n in range(1, 15)),
}  # fmt: skip


def _valid_signal(text: str) -> bool:
    """moby/sys/signal.ParseSignal on Linux: a non-zero number or a name (SIG optional)."""
    if re.fullmatch(r"[+-]?[0-9]+", text):
        return int(text) != 0 and -(2**63) <= int(text) < 2**63
    name = text.upper()
    return name.removeprefix("SIG") in _SIGNALS


_REFERENCE_RE = re.compile(
    r"(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)


def _valid_reference(name: str) -> bool:
    return name == "scratch" or _REFERENCE_RE.fullmatch(name) is not None


def _expand_port(word: str, loc: Location) -> list[str]:
    """EXPOSE's parsePortSpec: `[ip:][hostport:]port[-end][/proto]` -> `port/proto` items."""
    spec, _, proto = word.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in ("tcp", "udp", "sctp"):
        raise DockerfileError(f"invalid proto: {proto}", location=loc)
    port = spec.rsplit(":", 1)[-1]
    if port == "":
        raise DockerfileError(f"no port specified: {word}<empty>", location=loc)
    lo, sep, hi = port.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()) or "-" in hi:
        raise DockerfileError(f"invalid containerPort: {port}", location=loc)
    start, end = int(lo), int(hi) if sep else int(lo)
    if start > 65535 or end > 65535 or end < start:
        raise DockerfileError(f"invalid containerPort: {port}", location=loc)
    return [f"{p}/{proto}" for p in range(start, end + 1)]
