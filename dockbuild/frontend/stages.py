"""Build stages: the split of a Dockerfile into stages, the stage table (lookup by name or
index, target selection, cycles), the meta ARGs before the first FROM, and the state of a
stage while it is converted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dockbuild import llb
from dockbuild.errors import DockerfileError, Location
from dockbuild.frontend import checks
from dockbuild.frontend.instructions import ArgCommand, FromCommand, Instruction
from dockbuild.frontend.parse_instructions import parse_instruction
from dockbuild.frontend.parser import ParseResult
from dockbuild.frontend.shell import Lex, ShellError
from dockbuild.frontend.suggest import suggest


@dataclass
class Stage:
    """A build stage: its FROM and the instructions after it. `name` is lower-cased ("" if
    unnamed); `base_name` and `platform` are raw words; `index` counts stages from 0."""

    name: str
    base_name: str
    platform: str
    commands: list[Instruction]
    location: Location
    index: int
    original: str = ""
    comment: str = ""


@dataclass(frozen=True)
class NamedSource:
    """What a FROM / --from name stands for outside the Dockerfile."""

    kind: str  # "image" | "local"
    identifier: str  # a pinned SourceOp identifier
    config: dict[str, Any] | None  # the image config (images only)
    name: str  # how progress shows it


@dataclass
class StageState:
    """A stage while it is being converted: its graph state, image config and scopes."""

    spec: Stage
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
    # What the stage starts from, once resolved (`base_resolved`): an earlier stage, an
    # image, or None for scratch.
    base: StageState | NamedSource | None = None
    base_resolved: bool = False
    commands: list[Instruction] | None = None  # ONBUILD triggers + the stage's own
    triggers: int = 0  # how many of `commands` are triggers of the base
    step_total: int = 0
    step_index: int = 0
    workdir_set: bool = False
    used_once: dict[str, Location] = field(default_factory=dict)
    env_index: dict[str, int] | None = None  # config Env key -> position, kept by ENV
    # The ops this stage's own steps made (what --no-cache-filter names by stage).
    ops: list[llb.Op] = field(default_factory=list)
    # The platform the stage builds for (FROM --platform, its base stage's, else the
    # target's), normalised; set with `base_resolved`.
    platform: str = ""

    @property
    def display_name(self) -> str:
        return self.spec.name or f"stage-{self.spec.index}"

    def assign_env(self, key: str, value: str) -> None:
        """EnvList.AddOrReplace on the stage's env: the key moves to the end."""
        pair = f"{key}={value}"
        if key in self.env:
            del self.env[key], self.env_pairs[key]
        self.env[key] = value
        self.env_pairs[key] = pair
        if key in self.arg_pairs:
            self.arg_pairs[key] = pair
        self.run_env = None


def parse_stages(result: ParseResult) -> tuple[list[Stage], list[ArgCommand]]:
    """Split a parsed Dockerfile into stages and the meta ARGs before the first FROM.

    Any instruction other than ARG before the first FROM is an error, as in BuildKit.
    """
    stages: list[Stage] = []
    meta_args: list[ArgCommand] = []
    for node in result.children:
        instruction = parse_instruction(node, result.filename)
        if isinstance(instruction, FromCommand):
            stages.append(
                Stage(
                    name=instruction.stage_name,
                    base_name=instruction.base_name,
                    platform=instruction.platform,
                    commands=[],
                    location=instruction.location,
                    index=len(stages),
                    original=instruction.original.strip(),
                    comment=instruction.comment,
                )
            )
        elif not stages:
            if isinstance(instruction, ArgCommand):
                meta_args.append(instruction)
                continue
            raise DockerfileError(
                f"no build stage in current context: {node.value.upper()} comes before the "
                "first FROM (only ARG may appear there)",
                location=instruction.location,
            )
        else:
            stages[-1].commands.append(instruction)
    return stages, meta_args


# -- the stage table ---------------------------------------------------------------------


def stage_by_name(
    stages: Sequence[StageState], name: str, before: int | None = None
) -> StageState | None:
    """A stage by its (case-insensitive) name; with `before`, only earlier stages (FROM
    sees only the stages above it). A repeated name means the last one."""
    low = name.lower()
    found = None
    for st in stages:
        if before is not None and st.spec.index >= before:
            break
        if st.spec.name and st.spec.name == low:
            found = st
    return found


def stage_by_ref(stages: Sequence[StageState], ref: str) -> StageState | None:
    """--from names a stage by name or by index."""
    if ref.isdigit():
        index = int(ref)
        if index >= len(stages):
            raise DockerfileError(f"invalid stage index {index}")
        return stages[index]
    return stage_by_name(stages, ref)


def similar_stage(stages: Sequence[StageState], name: str, before: int | None = None) -> str:
    """The stage name closest to `name` (a typo), or ""; with `before`, among the stages
    above that index only."""
    names = [st.spec.name for st in stages[:before] if st.spec.name]
    return suggest(name.lower(), names)


def target_stage(stages: Sequence[StageState], target: str | None) -> StageState:
    """The stage --target names; the last stage without one."""
    if target is None:
        return stages[-1]
    found = stage_by_name(stages, target)
    if found is None:
        match = similar_stage(stages, target)
        hint = f" (did you mean {match}?)" if match else ""
        raise DockerfileError(f'target stage "{target}" could not be found{hint}')
    return found


def check_cycles(
    stages: Sequence[StageState], lex: Lex, global_args: dict[str, str | None]
) -> None:
    """Any cycle among the stages is an error, used or not (validateCircularDependency)."""
    edges: dict[int, list[int]] = {}
    for st in stages:
        targets = []
        earlier = None
        try:
            name = lex.process_word(st.spec.base_name, defined(global_args))
            earlier = stage_by_name(stages, name, before=st.spec.index)
        except ShellError:
            pass
        if earlier is not None:
            targets.append(earlier.spec.index)
        for cmd in st.spec.commands:
            for ref in cmd.from_refs:
                if "$" in ref:
                    continue
                try:
                    dep = stage_by_ref(stages, ref)
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

    for st in stages:
        if visit(st.spec.index):
            raise DockerfileError(
                f"circular dependency detected on stage: {st.display_name}",
                location=st.spec.location,
            )


# -- meta ARGs ---------------------------------------------------------------------------


@dataclass
class MetaArgs:
    """The global scope the ARGs before the first FROM make (FROM lines expand with it)."""

    scope: dict[str, str | None]  # with the build args applied
    defaults: dict[str, str | None]  # from the Dockerfile's defaults alone (for the checks)
    names: set[str]  # the names the meta ARGs declare
    used: set[str]  # the build args they consumed


def platform_args(target: str, build: str) -> dict[str, str]:
    """BUILDPLATFORM, TARGETOS, ...: the automatic platform ARGs (BuildKit's
    buildPlatformOpt/targetPlatform), BUILD* of the machine that builds, TARGET* of the
    platform built for."""
    out = {}
    for prefix, platform in (("BUILD", build), ("TARGET", target)):
        os_, _, rest = platform.partition("/")
        arch, _, variant = rest.partition("/")
        out[f"{prefix}PLATFORM"] = platform
        out[f"{prefix}OS"] = os_
        out[f"{prefix}OSVERSION"] = ""
        out[f"{prefix}ARCH"] = arch
        out[f"{prefix}VARIANT"] = variant
    return out


def meta_arg_scope(
    meta_args: list[ArgCommand],
    target: StageState,
    platforms: tuple[str, str],
    build_args: dict[str, str],
    lex: Lex,
    linter: checks.Linter,
) -> MetaArgs:
    """The global scope; ``platforms`` is (target platform, build platform)."""
    scope: dict[str, str | None] = dict(platform_args(*platforms))
    scope["TARGETSTAGE"] = target.spec.name or "default"  # BuildKit's defaultArgs
    defaults = dict(scope)
    used: set[str] = set()
    for cmd in meta_args:
        for key, default in cmd.args:
            checks.check_secret_name("ARG", key, cmd.location, linter)
            if default is not None:
                try:
                    defaults[key] = lex.process_word(default, defined(defaults))
                except ShellError:
                    defaults[key] = None
            elif key not in defaults:
                defaults[key] = None
            if key in build_args:
                scope[key] = build_args[key]
                used.add(key)
            elif default is not None:
                try:
                    scope[key] = lex.process_word(default, defined(scope))
                except ShellError as e:
                    raise DockerfileError(str(e), location=cmd.location) from None
            else:
                scope[key] = None
    names = {key for cmd in meta_args for key, _ in cmd.args}
    return MetaArgs(scope, defaults, names, used)


def defined(scope: dict[str, str | None]) -> dict[str, str]:
    """The names of a scope that have a value."""
    return {k: v for k, v in scope.items() if v is not None}
