"""Parser nodes -> typed, checked instructions (BuildKit's instructions/parse.go and
bflag.go): arguments, flags and the checks BuildKit applies before building."""

from __future__ import annotations

import re
from collections.abc import Callable

from dockbuild import llb
from dockbuild.errors import DockerfileError, Location
from dockbuild.frontend.goformat import parse_go_duration
from dockbuild.frontend.instructions import (
    AddCommand,
    ArgCommand,
    CmdCommand,
    CopyCommand,
    EntrypointCommand,
    EnvCommand,
    ExposeCommand,
    FromCommand,
    HealthcheckCommand,
    HeredocSource,
    InlineFile,
    Instruction,
    LabelCommand,
    MaintainerCommand,
    OnbuildCommand,
    RunCommand,
    ShellCommand,
    StopSignalCommand,
    UserCommand,
    VolumeCommand,
    WorkdirCommand,
)
from dockbuild.frontend.mounts import MountFlagError, parse_mount_fields
from dockbuild.frontend.parser import (
    INSTRUCTION_NAMES,
    Heredoc,
    Node,
    chomp_heredoc_content,
    parse_heredoc,
    split_command,
)
from dockbuild.frontend.suggest import with_suggestion

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

    def boolean(self, name: str) -> bool:
        return self.values[name] == "true"

    def optional_boolean(self, name: str) -> bool | None:
        return self.boolean(name) if name in self.used else None

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
                    with_suggestion(f"unknown flag: --{name}", name, sorted(self.kinds), True)
                )
            if name in self.used and kind != "strings":
                raise _InstructionError(f"duplicate flag specified: --{name}")
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
                with_suggestion(f"unknown instruction: {word}", word, INSTRUCTION_NAMES, False)
            )
        return parse_node(_Request(node, location))
    except _InstructionError as err:
        raise DockerfileError(str(err), location=location) from None


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
    if network not in llb.NETWORK_MODES:
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
            mounts.append(parse_mount_fields(spec, None))
        except MountFlagError as err:
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
        link=flags.boolean("link"),
        parents=flags.boolean("parents"),
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
        link=flags.boolean("link"),
        exclude=flags.strings("exclude"),
        checksum=flags.string("checksum"),
        keep_git_dir=flags.optional_boolean("keep-git-dir"),
        unpack=flags.optional_boolean("unpack"),
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
