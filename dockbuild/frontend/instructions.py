"""Parser nodes -> typed, checked instructions, and the split of a Dockerfile into stages.

This mirrors BuildKit's `frontend/dockerfile/instructions` (commands.go, parse.go, bflag.go,
commands_run*.go). Every string field is a raw, unexpanded word unless its docstring says
otherwise: variable expansion happens later (`shell`), with the ARG/ENV scope that only
the conversion step knows, just as BuildKit expands after parsing.

The instructions are plain dataclasses, not frozen ones: nothing changes them after
parsing, and a big Dockerfile makes thousands of them (a frozen dataclass sets each field
through object.__setattr__, about three times the cost).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import ClassVar

from dockbuild.errors import DockerfileError, Location
from dockbuild.frontend.parser import (
    INSTRUCTION_NAMES,
    Heredoc,
    Node,
    ParseResult,
    chomp_heredoc_content,
    parse_heredoc,
    split_command,
)

# --- base and shared types -------------------------------------------------------------


@dataclass(kw_only=True, repr=False, eq=False)
class Instruction:
    """Fields every instruction has: where it is and its text (the joined logical line)."""

    keyword: ClassVar[str] = ""
    # The stages, named contexts or images the instruction reads (COPY --from, RUN
    # --mount from=), raw; the two that have any override this.
    from_refs: ClassVar[tuple[str, ...]] = ()
    location: Location
    original: str

    def __repr__(self) -> str:
        # One for every instruction class, rather than one generated per class: each
        # generated method is compiled at import, which is part of every build's start.
        # (Instructions compare by identity: nothing compares two of them.)
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclass_fields(self))
        return f"{type(self).__name__}({fields})"


@dataclass
class InlineFile:
    """A RUN heredoc: `name` is the delimiter, `data` the raw body (tabs not yet stripped
    when `chomp`; see `chomped_data`)."""

    name: str
    data: str
    chomp: bool = False
    expand: bool = True
    file_descriptor: int = 0

    @property
    def chomped_data(self) -> str:
        """The body as the command sees it (leading tabs removed for `<<-`)."""
        return chomp_heredoc_content(self.data) if self.chomp else self.data


@dataclass
class HeredocSource:
    """A COPY/ADD heredoc source: written as file `path` (the delimiter word) with `data`
    (already tab-stripped for `<<-`; raw words, expanded later only if `expand`)."""

    path: str
    data: str
    expand: bool = True


# --- the instructions ------------------------------------------------------------------


@dataclass(kw_only=True, repr=False, eq=False)
class FromCommand(Instruction):
    """FROM [--platform=P] base [AS name]. `base_name` and `platform` are raw words (expanded
    later with global ARGs only); `stage_name` is lower-cased, "" when unnamed."""

    keyword: ClassVar[str] = "from"
    base_name: str
    stage_name: str = ""
    platform: str = ""
    comment: str = ""


@dataclass
class MountSpec:
    """One `RUN --mount`. String fields are raw words.

    When parsed without an expander (as `parse_instruction` does), values that need
    expansion (they contain `$`, a quote or a backslash) are kept as written and not yet
    checked, and `deferred` is True; `parse_mount(spec, expand)` gives the final form.
    Defaults that depend on other mounts (secret target, ssh id/target, cache id) are
    left empty for the conversion step to fill, as BuildKit does.
    """

    type: str = "bind"
    from_: str = ""
    source: str = ""
    target: str = ""
    read_only: bool = True
    id: str = ""
    sharing: str = ""
    required: bool = False
    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    env: str | None = None
    deferred: bool = False


@dataclass(kw_only=True, repr=False, eq=False)
class RunCommand(Instruction):
    """RUN. `cmd_line` holds one raw string for the shell form (`prepend_shell` True) or
    the JSON array items for the exec form. `files` are the heredocs. `mounts` are parsed
    `--mount` flags and `mount_specs` their raw CSV text (re-parse with `parse_mount` and an
    expander at conversion time). `network` is default|none|host, `security` sandbox|insecure.
    """

    keyword: ClassVar[str] = "run"
    cmd_line: tuple[str, ...]
    prepend_shell: bool
    files: tuple[InlineFile, ...] = ()
    mounts: tuple[MountSpec, ...] = ()
    mount_specs: tuple[str, ...] = ()
    network: str = "default"
    security: str = "sandbox"
    flags_used: tuple[str, ...] = ()

    # The heredoc when the whole command is one (`RUN <<EOF`), as BuildKit's
    # MustParseHeredoc(CmdLine[0]) finds it: its body is run as the command (or as a file,
    # with a shebang) instead of being part of a reconstituted script.
    single_heredoc: InlineFile | None = None

    @property
    def from_refs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(m.from_ for m in self.mounts if m.from_) if self.mounts else ()


@dataclass(kw_only=True, repr=False, eq=False)
class CmdCommand(Instruction):
    """CMD: `cmd_line` is one raw string (shell form, `prepend_shell`) or the JSON items."""

    keyword: ClassVar[str] = "cmd"
    cmd_line: tuple[str, ...]
    prepend_shell: bool


@dataclass(kw_only=True, repr=False, eq=False)
class EntrypointCommand(Instruction):
    """ENTRYPOINT: like CMD; an empty `cmd_line` (`ENTRYPOINT []`) clears the entrypoint."""

    keyword: ClassVar[str] = "entrypoint"
    cmd_line: tuple[str, ...]
    prepend_shell: bool


@dataclass(kw_only=True, repr=False, eq=False)
class _CopyLike(Instruction):
    sources: tuple[str, ...]
    dest: str
    heredoc_sources: tuple[HeredocSource, ...] = ()
    chown: str = ""
    chmod: str = ""
    link: bool = False
    exclude: tuple[str, ...] = ()


@dataclass(kw_only=True, repr=False, eq=False)
class CopyCommand(_CopyLike):
    """COPY. `sources` (paths), `dest`, `from_`, `chown`, `chmod`, `exclude` are raw words;
    heredoc sources are in `heredoc_sources` (in their own order, after the paths)."""

    keyword: ClassVar[str] = "copy"
    from_: str = ""
    parents: bool = False

    @property
    def from_refs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.from_,) if self.from_ else ()


@dataclass(kw_only=True, repr=False, eq=False)
class AddCommand(_CopyLike):
    """ADD. Like COPY plus `checksum` (raw), `keep_git_dir` and `unpack` (None when the flag
    was not given, so the conversion step can apply the source-dependent default)."""

    keyword: ClassVar[str] = "add"
    checksum: str = ""
    keep_git_dir: bool | None = None
    unpack: bool | None = None


@dataclass(kw_only=True, repr=False, eq=False)
class EnvCommand(Instruction):
    """ENV: ordered raw (key, value) pairs; `legacy` when the `ENV k v` form was used."""

    keyword: ClassVar[str] = "env"
    env: tuple[tuple[str, str], ...]
    legacy: bool = False


@dataclass(kw_only=True, repr=False, eq=False)
class LabelCommand(Instruction):
    """LABEL: ordered raw (key, value) pairs; `legacy` for the `LABEL k v` form."""

    keyword: ClassVar[str] = "label"
    labels: tuple[tuple[str, str], ...]
    legacy: bool = False


@dataclass(kw_only=True, repr=False, eq=False)
class ArgCommand(Instruction):
    """ARG: raw (name, default) pairs; default None when the ARG has no `=`. `comments`
    holds the doc comment (`# NAME text`) found for each name, or ""."""

    keyword: ClassVar[str] = "arg"
    args: tuple[tuple[str, str | None], ...]
    comments: tuple[str, ...] = ()


@dataclass(kw_only=True, repr=False, eq=False)
class WorkdirCommand(Instruction):
    """WORKDIR: `path` is a raw word."""

    keyword: ClassVar[str] = "workdir"
    path: str


@dataclass(kw_only=True, repr=False, eq=False)
class UserCommand(Instruction):
    """USER: `user` is a raw word (`name[:group]`)."""

    keyword: ClassVar[str] = "user"
    user: str


@dataclass(kw_only=True, repr=False, eq=False)
class ShellCommand(Instruction):
    """SHELL: the JSON array items (never expanded)."""

    keyword: ClassVar[str] = "shell"
    shell: tuple[str, ...]


@dataclass(kw_only=True, repr=False, eq=False)
class ExposeCommand(Instruction):
    """EXPOSE: raw port words (`80`, `53/udp`, `8000-8010`), expanded later."""

    keyword: ClassVar[str] = "expose"
    ports: tuple[str, ...]


@dataclass(kw_only=True, repr=False, eq=False)
class VolumeCommand(Instruction):
    """VOLUME: raw path words (surrounding white space trimmed)."""

    keyword: ClassVar[str] = "volume"
    volumes: tuple[str, ...]


@dataclass(kw_only=True, repr=False, eq=False)
class StopSignalCommand(Instruction):
    """STOPSIGNAL: `signal` is a raw word (name or number)."""

    keyword: ClassVar[str] = "stopsignal"
    signal: str


@dataclass(kw_only=True, repr=False, eq=False)
class HealthcheckCommand(Instruction):
    """HEALTHCHECK. `test` is the image-config form, never expanded: ("NONE",),
    ("CMD", *exec_args) or ("CMD-SHELL", command). Durations are nanoseconds, 0 = inherit."""

    keyword: ClassVar[str] = "healthcheck"
    test: tuple[str, ...]
    interval: int = 0
    timeout: int = 0
    start_period: int = 0
    start_interval: int = 0
    retries: int = 0


@dataclass(kw_only=True, repr=False, eq=False)
class OnbuildCommand(Instruction):
    """ONBUILD: `expression` is the trigger as stored in the image config (the text after
    ONBUILD, heredoc bodies appended); `trigger` is its upper-cased instruction word."""

    keyword: ClassVar[str] = "onbuild"
    expression: str
    trigger: str = ""


@dataclass(kw_only=True, repr=False, eq=False)
class MaintainerCommand(Instruction):
    """MAINTAINER (deprecated): `maintainer` is the raw text."""

    keyword: ClassVar[str] = "maintainer"
    maintainer: str


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


# --- the flag parser (bflag.go) --------------------------------------------------------


class _InstructionError(Exception):
    """A problem in one instruction; parse_instruction adds the location."""


class BuilderFlags:
    """The `--name[=value]` flags of one instruction, checked strictly like BuildKit's BFlags.

    Declare the flags an instruction takes, then `parse()`: unknown flags (with a
    suggestion), duplicates of single-valued flags, missing values and non-boolean values
    for boolean flags are errors.
    """

    def __init__(self, raw: list[str]) -> None:
        self.raw = raw
        self.kinds: dict[str, str] = {}  # name -> "bool", "string" or "strings"
        self.values: dict[str, str] = {}  # bool ("true"/"false") and string flags
        self.lists: dict[str, list[str]] = {}  # strings flags (repeatable)
        self.used: list[str] = []

    def add_bool(self, name: str, default: bool = False) -> None:
        self.kinds[name] = "bool"
        self.values[name] = "true" if default else "false"

    def add_string(self, name: str, default: str = "") -> None:
        self.kinds[name] = "string"
        self.values[name] = default

    def add_strings(self, name: str) -> None:
        self.kinds[name] = "strings"
        self.lists[name] = []

    def string(self, name: str) -> str:
        return self.values[name]

    def strings(self, name: str) -> tuple[str, ...]:
        return tuple(self.lists[name])

    def bool(self, name: str) -> bool:
        return self.values[name] == "true"

    def optional_bool(self, name: str) -> bool | None:
        return self.bool(name) if name in self.used else None

    def parse(self) -> None:
        for arg in self.raw:
            if arg == "--":
                break
            if not arg.startswith("--"):
                raise _InstructionError(f"arg should start with -- : {arg}")
            name, has_value, value = arg[2:].partition("=")
            kind = self.kinds.get(name)
            if kind is None:
                raise _InstructionError(
                    _with_suggestion(f"unknown flag: {name}", name, sorted(self.kinds), True)
                )
            if name in self.used and kind != "strings":
                raise _InstructionError(f"duplicate flag specified: {name}")
            self.used.append(name)
            if kind == "bool":
                if has_value and value == "":
                    raise _InstructionError(f"missing a value on flag: {name}")
                lowered = value.lower()
                if lowered not in ("", "true", "false"):
                    raise _InstructionError(
                        f"expecting boolean value for flag {name}, not: {value}"
                    )
                self.values[name] = "false" if lowered == "false" else "true"
            elif not has_value:
                raise _InstructionError(f"missing a value on flag: {name}")
            elif kind == "string":
                self.values[name] = value
            else:
                self.lists[name].append(value)


# --- public entry points ---------------------------------------------------------------


def parse_instruction(node: Node, filename: str = "Dockerfile") -> Instruction:
    """The typed instruction for one parser node.

    FROM gives a FromCommand. Raises DockerfileError (located at the node's lines) for an
    unknown instruction, a bad flag or arguments BuildKit would refuse.
    """
    location = Location(filename, node.start_line, node.end_line)
    parse_node = _PARSERS.get(node.value)
    try:
        if parse_node is None:
            word = split_command(node.original)[0] or node.value
            raise _InstructionError(
                _with_suggestion(f"unknown instruction: {word}", word, INSTRUCTION_NAMES, False)
            )
        return parse_node(_Request(node, location))
    except _InstructionError as err:
        raise DockerfileError(str(err), location=location) from None


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


# --- instruction parsers (parse.go) ----------------------------------------------------


class _Request:
    """What one instruction parser needs from the node."""

    __slots__ = ("node", "location", "args", "original", "flags")

    def __init__(self, node: Node, location: Location) -> None:
        self.node = node
        self.location = location
        self.args = node.args if node.sub is None else _node_args(node)
        self.original = node.original
        self.flags = BuilderFlags(node.flags)


def _node_args(node: Node) -> list[str]:
    """The node's arguments (read only). ONBUILD's inner instruction contributes its word
    and its arguments, as in BuildKit."""
    if node.sub is not None:
        return [*node.args, node.sub.value, *_node_args(node.sub)]
    return node.args


def _json_args(req: _Request) -> tuple[str, ...]:
    if not req.args:
        return ()
    if req.node.json:
        return tuple(req.args)
    return (" ".join(req.args),)


def _parse_from(req: _Request) -> FromCommand:
    args = req.args
    stage_name = ""
    if len(args) == 3 and args[1].lower() == "as":
        stage_name = args[2].lower()
        if not _STAGE_NAME_RE.match(stage_name):
            raise _InstructionError(
                f"invalid name for build stage: {args[2]!r}, name can't start with a number "
                "or contain symbols"
            )
    elif len(args) != 1:
        raise _InstructionError("FROM requires either one or three arguments")
    req.flags.add_string("platform")
    req.flags.parse()
    return FromCommand(
        location=req.location,
        original=req.original,
        base_name=args[0],
        stage_name=stage_name,
        platform=req.flags.string("platform"),
        comment=_doc_comment(req.node.prev_comment, stage_name),
    )


_STAGE_NAME_RE = re.compile(r"^[a-z][a-z0-9\-_.]*\Z")


def _parse_run(req: _Request) -> RunCommand:
    flags = req.flags
    flags.add_strings("mount")
    flags.add_string("network", "default")
    flags.add_string("security", "sandbox")
    if any(raw[2:].partition("=")[0] == "device" for raw in req.node.flags):
        raise _InstructionError(
            "RUN --device is only available in the labs channel of the Dockerfile syntax "
            "(docker/dockerfile:1-labs), which dockbuild does not implement"
        )
    flags.parse()
    network = flags.string("network")
    if network not in _NETWORK_MODES:
        raise _InstructionError(
            f"unsupported network mode {network!r} (expected default, none or host)"
        )
    security = flags.string("security")
    if security not in _SECURITY_MODES:
        raise _InstructionError(
            f"unsupported security mode {security!r} (expected sandbox or insecure)"
        )
    specs = flags.strings("mount")
    mounts = []
    for spec in specs:
        try:
            mounts.append(_parse_mount(spec, None))
        except _InstructionError as err:
            raise _InstructionError(f"--mount={spec}: {err}") from None
    cmd_line = _json_args(req)
    if not cmd_line and not req.node.heredocs:
        raise _InstructionError("RUN requires at least one argument")
    files = tuple(_inline_file(h) for h in req.node.heredocs)
    single = None
    if files and not req.node.json and len(cmd_line) == 1:
        try:
            if parse_heredoc(cmd_line[0].strip()) is not None:
                single = files[0]
        except ValueError:
            pass
    return RunCommand(
        location=req.location,
        original=req.original,
        cmd_line=cmd_line,
        prepend_shell=not req.node.json,
        files=files,
        single_heredoc=single,
        mounts=tuple(mounts),
        mount_specs=specs,
        network=network,
        security=security,
        flags_used=tuple(dict.fromkeys(flags.used)),
    )


_NETWORK_MODES = ("default", "none", "host")
_SECURITY_MODES = ("sandbox", "insecure")


def _inline_file(heredoc: Heredoc) -> InlineFile:
    return InlineFile(
        name=heredoc.name,
        data=heredoc.content,
        chomp=heredoc.chomp,
        expand=heredoc.expand,
        file_descriptor=heredoc.file_descriptor,
    )


def _parse_cmd(req: _Request) -> CmdCommand:
    req.flags.parse()
    return CmdCommand(
        location=req.location,
        original=req.original,
        cmd_line=_json_args(req),
        prepend_shell=not req.node.json,
    )


def _parse_entrypoint(req: _Request) -> EntrypointCommand:
    req.flags.parse()
    return EntrypointCommand(
        location=req.location,
        original=req.original,
        cmd_line=_json_args(req),
        prepend_shell=not req.node.json,
    )


def _require_destination(req: _Request, command: str) -> None:
    if len(req.args) < 2:
        raise _InstructionError(
            f"{command} requires at least two arguments, but only one was provided. "
            "Destination could not be determined"
        )


def _sources_and_dest(
    req: _Request, command: str
) -> tuple[tuple[str, ...], str, tuple[HeredocSource, ...]]:
    *sources, dest = req.args
    if _heredoc_word(dest) is not None:
        raise _InstructionError(f"{command} cannot accept a heredoc as a destination")
    bodies = {heredoc.name: heredoc for heredoc in req.node.heredocs}
    paths: list[str] = []
    contents: list[HeredocSource] = []
    for source in sources:
        heredoc = _heredoc_word(source)
        if heredoc is None:
            paths.append(source)
            continue
        body = bodies.get(heredoc.name)
        data = body.content if body is not None else ""
        if heredoc.chomp:
            data = chomp_heredoc_content(data)
        contents.append(HeredocSource(path=heredoc.name, data=data, expand=heredoc.expand))
    return tuple(paths), dest, tuple(contents)


def _heredoc_word(word: str) -> Heredoc | None:
    # Like BuildKit's MustParseHeredoc: a word that does not lex is simply not a heredoc.
    try:
        return parse_heredoc(word)
    except ValueError:
        return None


def _parse_copy(req: _Request) -> CopyCommand:
    _require_destination(req, "COPY")
    flags = req.flags
    for name in ("from", "chown", "chmod"):
        flags.add_string(name)
    flags.add_bool("link")
    flags.add_bool("parents")
    flags.add_strings("exclude")
    flags.parse()
    sources, dest, contents = _sources_and_dest(req, "COPY")
    return CopyCommand(
        location=req.location,
        original=req.original,
        sources=sources,
        dest=dest,
        heredoc_sources=contents,
        from_=flags.string("from"),
        chown=flags.string("chown"),
        chmod=flags.string("chmod"),
        link=flags.bool("link"),
        parents=flags.bool("parents"),
        exclude=flags.strings("exclude"),
    )


def _parse_add(req: _Request) -> AddCommand:
    _require_destination(req, "ADD")
    flags = req.flags
    for name in ("chown", "chmod", "checksum"):
        flags.add_string(name)
    flags.add_bool("link")
    flags.add_bool("keep-git-dir")
    flags.add_bool("unpack")
    flags.add_strings("exclude")
    flags.parse()
    sources, dest, contents = _sources_and_dest(req, "ADD")
    return AddCommand(
        location=req.location,
        original=req.original,
        sources=sources,
        dest=dest,
        heredoc_sources=contents,
        chown=flags.string("chown"),
        chmod=flags.string("chmod"),
        link=flags.bool("link"),
        exclude=flags.strings("exclude"),
        checksum=flags.string("checksum"),
        keep_git_dir=flags.optional_bool("keep-git-dir"),
        unpack=flags.optional_bool("unpack"),
    )


def _key_value_pairs(req: _Request, command: str) -> tuple[tuple[tuple[str, str], ...], bool]:
    args = req.args
    if not args:
        raise _InstructionError(f"{command} requires at least one argument")
    if len(args) % 3:
        raise _InstructionError(f"Bad input to {command}, too many arguments")
    pairs = []
    legacy = False
    for index in range(0, len(args), 3):
        name, value, separator = args[index : index + 3]
        if name == "":
            raise _InstructionError(f"{command} names can not be blank")
        legacy = legacy or separator == ""
        pairs.append((name, value))
    return tuple(pairs), legacy


def _parse_env(req: _Request) -> EnvCommand:
    req.flags.parse()
    pairs, legacy = _key_value_pairs(req, "ENV")
    return EnvCommand(location=req.location, original=req.original, env=pairs, legacy=legacy)


def _parse_label(req: _Request) -> LabelCommand:
    req.flags.parse()
    pairs, legacy = _key_value_pairs(req, "LABEL")
    return LabelCommand(location=req.location, original=req.original, labels=pairs, legacy=legacy)


def _parse_arg(req: _Request) -> ArgCommand:
    if not req.args:
        raise _InstructionError("ARG requires at least one argument")
    req.flags.parse()
    pairs: list[tuple[str, str | None]] = []
    for word in req.args:
        name, has_value, value = word.partition("=")
        if has_value and name == "":
            raise _InstructionError("ARG names can not be blank")
        pairs.append((name, value if has_value else None))
    comments = tuple(_doc_comment(req.node.prev_comment, name) for name, _ in pairs)
    return ArgCommand(
        location=req.location, original=req.original, args=tuple(pairs), comments=comments
    )


def _exactly_one(req: _Request, command: str) -> str:
    if len(req.args) != 1:
        raise _InstructionError(f"{command} requires exactly one argument")
    req.flags.parse()
    return req.args[0]


def _parse_workdir(req: _Request) -> WorkdirCommand:
    return WorkdirCommand(
        location=req.location, original=req.original, path=_exactly_one(req, "WORKDIR")
    )


def _parse_user(req: _Request) -> UserCommand:
    return UserCommand(location=req.location, original=req.original, user=_exactly_one(req, "USER"))


def _parse_maintainer(req: _Request) -> MaintainerCommand:
    return MaintainerCommand(
        location=req.location, original=req.original, maintainer=_exactly_one(req, "MAINTAINER")
    )


def _parse_stopsignal(req: _Request) -> StopSignalCommand:
    return StopSignalCommand(
        location=req.location, original=req.original, signal=_exactly_one(req, "STOPSIGNAL")
    )


def _parse_expose(req: _Request) -> ExposeCommand:
    if not req.args:
        raise _InstructionError("EXPOSE requires at least one argument")
    req.flags.parse()
    return ExposeCommand(location=req.location, original=req.original, ports=tuple(req.args))


def _parse_volume(req: _Request) -> VolumeCommand:
    if not req.args:
        raise _InstructionError("VOLUME requires at least one argument")
    req.flags.parse()
    volumes = tuple(volume.strip() for volume in req.args)
    if "" in volumes:
        raise _InstructionError("VOLUME specified can not be an empty string")
    return VolumeCommand(location=req.location, original=req.original, volumes=volumes)


def _parse_shell(req: _Request) -> ShellCommand:
    req.flags.parse()
    shell = _json_args(req)
    if not shell:
        raise _InstructionError("SHELL requires at least one argument")
    if not req.node.json:
        raise _InstructionError(
            'SHELL requires the arguments to be in JSON form, e.g. SHELL ["/bin/bash", "-c"]'
        )
    return ShellCommand(location=req.location, original=req.original, shell=shell)


def _parse_onbuild(req: _Request) -> OnbuildCommand:
    if not req.args:
        raise _InstructionError("ONBUILD requires at least one argument")
    req.flags.parse()
    trigger = req.args[0].strip().upper()
    if trigger == "ONBUILD":
        raise _InstructionError("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
    if trigger in ("MAINTAINER", "FROM"):
        raise _InstructionError(f"{trigger} isn't allowed as an ONBUILD trigger")
    expression = _ONBUILD_PREFIX_RE.sub("", req.node.original, count=1)
    for heredoc in req.node.heredocs:
        expression += "\n" + heredoc.content + heredoc.name
    return OnbuildCommand(
        location=req.location, original=req.original, expression=expression, trigger=trigger
    )


_ONBUILD_PREFIX_RE = re.compile(r"^\s*ONBUILD\s*", re.IGNORECASE)


def _parse_healthcheck(req: _Request) -> HealthcheckCommand:
    if not req.args:
        raise _InstructionError("HEALTHCHECK requires at least one argument")
    kind = req.args[0].upper()
    args = req.args[1:]
    if kind == "NONE":
        # BuildKit does not look at flags here, so `HEALTHCHECK --interval=1s NONE` passes.
        if args:
            raise _InstructionError("HEALTHCHECK NONE takes no arguments")
        return HealthcheckCommand(location=req.location, original=req.original, test=("NONE",))
    flags = req.flags
    durations = ("interval", "timeout", "start-period", "start-interval")
    for name in (*durations, "retries"):
        flags.add_string(name)
    flags.parse()
    if kind != "CMD":
        raise _InstructionError(f"Unknown type {kind!r} in HEALTHCHECK (try CMD)")
    if not args:
        raise _InstructionError("Missing command after HEALTHCHECK CMD")
    test = ("CMD", *args) if req.node.json else ("CMD-SHELL", " ".join(args))
    interval, timeout, start_period, start_interval = (
        _health_interval(name, flags.string(name)) for name in durations
    )
    return HealthcheckCommand(
        location=req.location,
        original=req.original,
        test=test,
        interval=interval,
        timeout=timeout,
        start_period=start_period,
        start_interval=start_interval,
        retries=_health_retries(flags.string("retries")),
    )


_MINIMUM_DURATION = 1_000_000  # 1ms: Docker's container.MinimumDuration


def _health_interval(name: str, value: str) -> int:
    if value == "":
        return 0
    try:
        duration = parse_go_duration(value)
    except ValueError as err:
        raise _InstructionError(f"HEALTHCHECK --{name}: {err}") from None
    if duration == 0:
        return 0
    if duration < _MINIMUM_DURATION:
        raise _InstructionError(
            f"HEALTHCHECK --{name}={value}: the interval cannot be less than 1ms (0 inherits "
            "the default)"
        )
    return duration


def _health_retries(value: str) -> int:
    if value == "":
        return 0
    retries = int(value, 10) if re.fullmatch(r"[+-]?[0-9]+", value) else None
    if retries is None or not -(2**31) <= retries < 2**31:
        raise _InstructionError(f"HEALTHCHECK --retries={value}: not a 32-bit integer")
    if retries < 0:
        raise _InstructionError(f"--retries cannot be negative ({retries})")
    return retries


def _doc_comment(comments: list[str], name: str) -> str:
    # BuildKit's outline docs: a comment "NAME text" right above documents NAME.
    if not name:
        return ""
    for line in comments:
        if line.startswith(name + " "):
            return line[len(name) + 1 :]
    return ""


_PARSERS: dict[str, Callable[[_Request], Instruction]] = {
    "add": _parse_add,
    "arg": _parse_arg,
    "cmd": _parse_cmd,
    "copy": _parse_copy,
    "entrypoint": _parse_entrypoint,
    "env": _parse_env,
    "expose": _parse_expose,
    "from": _parse_from,
    "healthcheck": _parse_healthcheck,
    "label": _parse_label,
    "maintainer": _parse_maintainer,
    "onbuild": _parse_onbuild,
    "run": _parse_run,
    "shell": _parse_shell,
    "stopsignal": _parse_stopsignal,
    "user": _parse_user,
    "volume": _parse_volume,
    "workdir": _parse_workdir,
}


# --- RUN --mount (commands_runmount.go) ------------------------------------------------

MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret", "ssh")
_SHARING_MODES = ("shared", "private", "locked")
_MOUNT_KEYS = (
    "type", "from", "source", "target", "readonly", "id", "sharing", "required", "size",
    "mode", "uid", "gid", "src", "dst", "destination", "ro", "rw", "readwrite", "env",
)  # fmt: skip


def parse_mount(spec: str, expand: Callable[[str], str] | None = None) -> MountSpec:
    """Parse one `--mount` value (CSV `key=value` fields) into a MountSpec.

    With `expand` (a word expander with the step's ARG/ENV scope) every value is expanded
    first and all rules are checked. Without it, values that need expansion are kept raw
    and unchecked (`deferred`), the rest are checked now. Raises DockerfileError.
    """
    try:
        return _parse_mount(spec, expand)
    except _InstructionError as err:
        raise DockerfileError(f"--mount={spec}: {err}") from None


class _MountDraft:
    """A MountSpec while its fields are read, in any order; `freeze` makes the MountSpec."""

    def __init__(self) -> None:
        self.__dict__.update(_MOUNT_DEFAULTS)

    def set(self, **fields: object) -> _MountDraft:
        self.__dict__.update(fields)
        return self

    def freeze(self) -> MountSpec:
        return MountSpec(**self.__dict__)


_MOUNT_DEFAULTS = {f.name: f.default for f in dataclass_fields(MountSpec)}


def _parse_mount(spec: str, expand: Callable[[str], str] | None) -> MountSpec:
    fields = _csv_fields(spec)
    mount = _MountDraft()
    read_only_auto = True
    deferred = False
    for item in fields:
        key, has_value, value = item.partition("=")
        key = key.lower()
        if not has_value:
            if key in ("readonly", "ro"):
                mount, read_only_auto = mount.set(read_only=True), False
            elif key in ("readwrite", "rw"):
                mount, read_only_auto = mount.set(read_only=False), False
            elif key == "required":
                _require_type(mount, key, ("secret", "ssh"))
                mount = mount.set(required=True)
            else:
                raise _InstructionError(f"invalid field {item!r} must be a key=value pair")
            continue
        if key == "from" and _needs_expansion_dollar(value):
            raise _InstructionError(
                "'from' doesn't support variable expansion, define alias stage instead"
            )
        if expand is not None:
            value = expand(value)
        elif _needs_expansion(value):
            # Kept as written; type-dependent checks wait for the expanded form.
            deferred = True
            mount = _set_raw(mount, key, value, item)
            continue
        if key in ("readonly", "ro", "readwrite", "rw"):
            read_only_auto = False
        mount = _set_field(mount, key, value, item)
    if deferred:
        mount.deferred = True
        return mount.freeze()
    if mount.type not in ("secret", "ssh", "cache"):
        for name in ("mode", "uid", "gid"):
            if getattr(mount, name) is not None:
                raise _InstructionError(f"{name} not allowed for {mount.type!r} type mounts")
    if read_only_auto:
        mount = mount.set(read_only=mount.type not in ("cache", "tmpfs"))
    if mount.sharing and mount.type != "cache":
        raise _InstructionError(f"invalid cache sharing set for {mount.type} mount")
    if mount.type == "secret":
        if mount.from_:
            raise _InstructionError("secret mount should not have a from")
        if not (mount.source or mount.target or mount.id):
            raise _InstructionError("invalid secret mount. one of source, target required")
        if mount.source and mount.id:
            raise _InstructionError("both source and id can't be set")
    return mount.freeze()


def _needs_expansion(value: str) -> bool:
    return any(ch in value for ch in "$'\"\\")


def _needs_expansion_dollar(value: str) -> bool:
    # A `$` at the very end expands to itself, so only an earlier one is a variable.
    index = value.find("$")
    return index != -1 and index != len(value) - 1


def _require_type(mount: _MountDraft, key: str, types: tuple[str, ...]) -> None:
    if mount.type not in types:
        raise _InstructionError(f"unexpected key {key!r} for mount type {mount.type!r}")


def _set_raw(mount: _MountDraft, key: str, value: str, item: str) -> _MountDraft:
    target = _RAW_FIELDS.get(key)
    if target is None and key not in _MOUNT_KEYS:
        raise _InstructionError(
            _with_suggestion(f"unexpected key {key!r} in {item!r}", key, _MOUNT_KEYS, True)
        )
    return mount.set(**{target: value}) if target else mount


_RAW_FIELDS = {
    "type": "type",
    "from": "from_",
    "source": "source",
    "src": "source",
    "target": "target",
    "dst": "target",
    "destination": "target",
    "id": "id",
    "sharing": "sharing",
    "env": "env",
}


def _set_field(mount: _MountDraft, key: str, value: str, item: str) -> _MountDraft:
    if key == "type":
        lowered = value.lower()
        if lowered not in MOUNT_TYPES:
            raise _InstructionError(
                _with_suggestion(f"unsupported mount type {value!r}", value, MOUNT_TYPES, True)
            )
        return mount.set(type=lowered)
    if key in ("readonly", "ro", "readwrite", "rw"):
        flag = _parse_go_bool(value)
        if flag is None:
            raise _InstructionError(f"invalid value for {key}: {value}")
        return mount.set(read_only=flag if key in ("readonly", "ro") else not flag)
    if key == "required":
        _require_type(mount, key, ("secret", "ssh"))
        flag = _parse_go_bool(value)
        if flag is None:
            raise _InstructionError(f"invalid value for {key}: {value}")
        return mount.set(required=flag)
    if key == "size":
        _require_type(mount, key, ("tmpfs",))
        size = parse_ram_in_bytes(value)
        if size is None:
            raise _InstructionError(f"invalid value for {key}: {value}")
        return mount.set(size=size)
    if key == "sharing":
        if mount.type != "cache":
            raise _InstructionError(f"invalid cache sharing set for {mount.type} mount")
        if value.lower() not in _SHARING_MODES:
            raise _InstructionError(
                f"unsupported sharing value {value!r} (expected shared, private or locked)"
            )
        return mount.set(sharing=value.lower())
    if key in ("mode", "uid", "gid"):
        number = _parse_uint32(value, 8 if key == "mode" else 10)
        if number is None:
            raise _InstructionError(f"invalid value {value} for {key}")
        return mount.set(**{key: number})
    target = _RAW_FIELDS.get(key)
    if target is None:
        raise _InstructionError(
            _with_suggestion(f"unexpected key {key!r} in {item!r}", key, _MOUNT_KEYS, True)
        )
    return mount.set(**{target: value})


def _csv_fields(text: str) -> list[str]:
    """One CSV record as Go's encoding/csv reads it (quotes only around whole fields)."""
    if '"' not in text:
        return text.split(",")  # no quoting: the common case
    fields: list[str] = []
    index = 0
    length = len(text)
    while True:
        if index < length and text[index] == '"':
            index += 1
            value = ""
            while True:
                end = text.find('"', index)
                if end < 0:
                    raise _InstructionError(f'extraneous or missing " in quoted-field: {text}')
                value += text[index:end]
                index = end + 1
                if index < length and text[index] == '"':
                    value += '"'
                    index += 1
                    continue
                break
            if index < length and text[index] != ",":
                raise _InstructionError(f'extraneous or missing " in quoted-field: {text}')
        else:
            end = text.find(",", index)
            end = length if end < 0 else end
            value = text[index:end]
            if '"' in value:
                raise _InstructionError(f'bare " in non-quoted-field: {text}')
            index = end
        fields.append(value)
        if index >= length:
            return fields
        index += 1  # the comma


# --- Go-compatible value parsers -------------------------------------------------------


def _parse_go_bool(value: str) -> bool | None:
    # strconv.ParseBool's spellings.
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    return None


def _parse_uint32(value: str, base: int) -> int | None:
    digits = "01234567" if base == 8 else "0123456789"
    if not value or any(ch not in digits for ch in value):
        return None
    number = int(value, base)
    return number if number < 2**32 else None


_RAM_RE = re.compile(r"([0-9]+(?:\.[0-9]+)*) ?([kKmMgGtTpP])?[iI]?[bB]?")


def parse_ram_in_bytes(value: str) -> int | None:
    """A size such as `64m`, `1.5GiB` or `512` in bytes (docker/go-units RAMInBytes)."""
    match = _RAM_RE.fullmatch(value)
    if match is None:
        return None
    try:
        number = float(match.group(1))
    except ValueError:
        return None
    power = " kmgtp".index(match.group(2).lower()) if match.group(2) else 0
    return int(number * 1024**power)


_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


_DURATION_NUMBER_RE = re.compile(r"([0-9]*)(?:\.([0-9]*))?")


def parse_go_duration(text: str) -> int:
    """Go's time.ParseDuration (`1h30m`, `1.5s`, `300ms`, `0`) in nanoseconds.

    Raises ValueError with Go's message for anything Go would refuse.
    """
    original = text
    negative = False
    if text and text[0] in "+-":
        negative = text[0] == "-"
        text = text[1:]
    if text == "0":
        return 0
    if text == "":
        raise ValueError(f"time: invalid duration {original!r}")
    total = 0
    while text:
        match = _DURATION_NUMBER_RE.match(text)
        assert match is not None  # the pattern matches the empty string
        whole, fraction = match.group(1), match.group(2)
        if not whole and not fraction:
            raise ValueError(f"time: invalid duration {original!r}")
        text = text[match.end() :]
        end = 0
        while end < len(text) and text[end] not in ".0123456789":
            end += 1
        if end == 0:
            raise ValueError(f"time: missing unit in duration {original!r}")
        unit = text[:end]
        text = text[end:]
        scale = _DURATION_UNITS.get(unit)
        if scale is None:
            raise ValueError(f"time: unknown unit {unit!r} in duration {original!r}")
        value = int(whole or "0") * scale
        if fraction:
            value += int(fraction) * scale // 10 ** len(fraction)
        total += value
        if total > 2**63 - 1 + (1 if negative else 0):
            raise ValueError(f"time: invalid duration {original!r}")
    return -total if negative else total


# --- suggestions (util/suggest) --------------------------------------------------------


def _with_suggestion(
    message: str, value: str, options: tuple[str, ...] | list[str], case_sensitive: bool
) -> str:
    match = _closest(value, options, case_sensitive)
    return f"{message} (did you mean {match}?)" if match else message


def _closest(value: str, options: tuple[str, ...] | list[str], case_sensitive: bool) -> str:
    if not case_sensitive:
        value = value.lower()
    best, best_distance = "", 3  # at most two edits away, as BuildKit (and HCL) suggest
    for option in options:
        candidate = option if case_sensitive else option.lower()
        if candidate == value:
            return ""
        distance = _levenshtein(value, candidate)
        if distance < best_distance:
            best, best_distance = candidate, distance
    return best


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]
