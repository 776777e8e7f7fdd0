"""The instructions that set the image config, and WORKDIR: ENV, ARG, LABEL, USER, CMD,
ENTRYPOINT, SHELL, EXPOSE, VOLUME, STOPSIGNAL, HEALTHCHECK, ONBUILD, MAINTAINER (BuildKit's
dispatchEnv, dispatchArg, ... in dockerfile2llb). Each handler records its history entry.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dockbuild import llb
from dockbuild.errors import DockerfileError, Location
from dockbuild.frontend import checks
from dockbuild.frontend import instructions as ins
from dockbuild.frontend.goformat import go_duration, go_list, go_quote_list
from dockbuild.frontend.stages import StageState

if TYPE_CHECKING:
    from dockbuild.frontend.convert import Converter

DEFAULT_SHELL = ["/bin/sh", "-c"]
# ARGs that configure the build's SBOM scan: in the ARG scope, never in RUN's environment.
NON_ENV_ARGS = {"BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"}


def env(conv: Converter, stage: StageState, cmd: ins.EnvCommand, name: str) -> None:
    env = stage.env  # every pair sees the values from before this ENV
    pairs = [
        (conv.expand(k, env, cmd.location), conv.expand(v, env, cmd.location)) for k, v in cmd.env
    ]
    current = stage.config.setdefault("Env", [])
    index = stage.env_index
    if index is None or len(index) != len(current):
        index = {item.partition("=")[0]: i for i, item in enumerate(current)}
        stage.env_index = index
    for key, value in pairs:
        checks.check_secret_name("ENV", key, cmd.location, conv.linter)
        if key in index:
            current[index[key]] = f"{key}={value}"
        else:
            index[key] = len(current)
            current.append(f"{key}={value}")
        stage.assign_env(key, value)
    conv.commit(stage, "ENV " + " ".join(f"{k}={v}" for k, v in pairs))


def arg(conv: Converter, stage: StageState, cmd: ins.ArgCommand, name: str) -> None:
    parts = []
    for key, default in cmd.args:
        checks.check_secret_name("ARG", key, cmd.location, conv.linter)
        if key in conv.opts.build_args:
            value: str | None = conv.opts.build_args[key]
            conv.used_args.add(key)
        elif default is not None:
            value = conv.expand(default, stage.env, cmd.location)
        elif key in conv.global_args:
            value = conv.global_args[key]
        else:
            value = None
        stage.args[key] = value
        if value is not None and key not in NON_ENV_ARGS:
            stage.assign_env(key, value)
        shown = stage.env.get(key, value or "")
        stage.arg_pairs[key] = f"{key}={shown}"
        parts.append(key if value is None else f"{key}={value}")
    conv.commit(stage, "ARG " + " ".join(parts))


def label(conv: Converter, stage: StageState, cmd: ins.LabelCommand, name: str) -> None:
    env = stage.env
    labels = stage.config.setdefault("Labels", {}) or {}
    stage.config["Labels"] = labels
    shown = []
    for k, v in cmd.labels:
        key, value = conv.expand(k, env, cmd.location), conv.expand(v, env, cmd.location)
        labels[key] = value
        shown.append(f"{key}={value}")
    conv.commit(stage, "LABEL " + " ".join(shown))


def maintainer(conv: Converter, stage: StageState, cmd: ins.MaintainerCommand, name: str) -> None:
    stage.image["author"] = cmd.maintainer
    conv.commit(stage, f"MAINTAINER {cmd.maintainer}")


def user(conv: Converter, stage: StageState, cmd: ins.UserCommand, name: str) -> None:
    user = conv.expand(cmd.user, stage.env, cmd.location)
    stage.config["User"] = user
    conv.commit(stage, f"USER {user}")


def command_args(stage: StageState, cmd_line: Sequence[str], prepend_shell: bool) -> list[str]:
    """CMD/ENTRYPOINT/RUN arguments: the exec form as written, the shell form under SHELL."""
    if prepend_shell:
        return [*(stage.config.get("Shell") or DEFAULT_SHELL), " ".join(cmd_line)]
    return list(cmd_line)


def _used_once(conv: Converter, stage: StageState, cmd: ins.Instruction, word: str) -> None:
    """MultipleInstructionsDisallowed: the earlier instruction is the one reported."""
    earlier = stage.used_once.get(word)
    if earlier is not None:
        conv.linter.run(
            "MultipleInstructionsDisallowed",
            f"Multiple {word} instructions should not be used in the same stage because "
            "only the last one will be used",
            earlier,
        )
    stage.used_once[word] = cmd.location


def _json_args_check(conv: Converter, stage: StageState, cmd: ins.Instruction, word: str) -> None:
    if not stage.config.get("Shell"):
        conv.linter.run(
            "JSONArgsRecommended",
            f"JSON arguments recommended for {word} to prevent unintended behavior related "
            "to OS signals",
            cmd.location,
        )


def cmd(conv: Converter, stage: StageState, cmd: ins.CmdCommand, name: str) -> None:
    _used_once(conv, stage, cmd, "CMD")
    if cmd.prepend_shell:
        _json_args_check(conv, stage, cmd, "CMD")
    args = command_args(stage, list(cmd.cmd_line), cmd.prepend_shell)
    stage.config["Cmd"] = args
    stage.config["ArgsEscaped"] = True  # BuildKit sets it for every CMD
    stage.cmd_set = True
    conv.commit(stage, f"CMD {go_quote_list(args)}")


def entrypoint(conv: Converter, stage: StageState, cmd: ins.EntrypointCommand, name: str) -> None:
    _used_once(conv, stage, cmd, "ENTRYPOINT")
    if cmd.prepend_shell:
        _json_args_check(conv, stage, cmd, "ENTRYPOINT")
    args = command_args(stage, list(cmd.cmd_line), cmd.prepend_shell)
    stage.config["Entrypoint"] = args
    if not stage.cmd_set:
        stage.config["Cmd"] = None
    conv.commit(stage, f"ENTRYPOINT {go_quote_list(args)}")


def shell(conv: Converter, stage: StageState, cmd: ins.ShellCommand, name: str) -> None:
    stage.config["Shell"] = list(cmd.shell)
    conv.commit(stage, f"SHELL {go_list(list(cmd.shell))}")


def expose(conv: Converter, stage: StageState, cmd: ins.ExposeCommand, name: str) -> None:
    env = stage.env
    ports = stage.config.setdefault("ExposedPorts", {}) or {}
    stage.config["ExposedPorts"] = ports
    added = []
    # BuildKit's parseExpose sorts the words as written, before expansion.
    for raw in sorted(cmd.ports):
        for word in conv.expand_words(raw, env, cmd.location):
            proto = word.partition("/")[2]
            if proto and proto.lower() != proto:
                conv.linter.run(
                    "ExposeProtoCasing",
                    f"Defined protocol '{word}' in EXPOSE instruction should be lowercase",
                    cmd.location,
                )
            if ":" in word.partition("/")[0]:
                conv.linter.run(
                    "ExposeInvalidFormat",
                    f"EXPOSE instruction should not define an IP address or host-port "
                    f"mapping, found '{word}'",
                    cmd.location,
                )
            for port in _expand_port(word, cmd.location):
                ports[port] = {}
                added.append(port)
    conv.commit(stage, f"EXPOSE {go_list(added)}")


def volume(conv: Converter, stage: StageState, cmd: ins.VolumeCommand, name: str) -> None:
    env = stage.env
    vols = stage.config.setdefault("Volumes", {}) or {}
    stage.config["Volumes"] = vols
    added = []
    for raw in cmd.volumes:
        v = conv.expand(raw, env, cmd.location)
        if v == "":
            raise DockerfileError(
                "VOLUME specified can not be an empty string", location=cmd.location
            )
        vols[v] = {}
        added.append(v)
    conv.commit(stage, f"VOLUME {go_list(added)}")


def stopsignal(conv: Converter, stage: StageState, cmd: ins.StopSignalCommand, name: str) -> None:
    sig = conv.expand(cmd.signal, stage.env, cmd.location)
    if not _valid_signal(sig):
        raise DockerfileError(f"Invalid signal: {sig}", location=cmd.location)
    stage.config["StopSignal"] = sig
    conv.commit(stage, f"STOPSIGNAL {sig}")


def healthcheck(conv: Converter, stage: StageState, cmd: ins.HealthcheckCommand, name: str) -> None:
    _used_once(conv, stage, cmd, "HEALTHCHECK")
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
        [f"Test:{go_list(list(cmd.test))}"]
        + [f"{key}:{go_duration(value)}" for key, value in fields]
        + [f"Retries:{cmd.retries}"]
    )
    conv.commit(stage, "HEALTHCHECK {" + shown + "}")


def onbuild(conv: Converter, stage: StageState, cmd: ins.OnbuildCommand, name: str) -> None:
    # Stored for the images built on this one; BuildKit writes no history entry.
    triggers = stage.config.setdefault("OnBuild", []) or []
    stage.config["OnBuild"] = triggers
    triggers.append(cmd.expression)


def workdir(conv: Converter, stage: StageState, cmd: ins.WorkdirCommand, name: str) -> None:
    raw = conv.expand(cmd.path, stage.env, cmd.location)
    if not stage.workdir_set and not raw.startswith("/"):
        conv.linter.run(
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
        conv.commit(stage, "WORKDIR /")
        return
    name = conv.step_name(stage, upper_first(name), conv.onbuild)
    # BuildKit creates the directory as the current USER (only new directories).
    user = stage.config.get("User") or ""
    owner = llb.Chown(*user.split(":", 1)) if user else None
    # As BuildKit's dispatchWorkdir (llb.WithCreatedTime(epoch)): with SOURCE_DATE_EPOCH
    # the directory gets the epoch as its mtime, so the layer is reproducible.
    epoch = conv.opts.build_args.get("SOURCE_DATE_EPOCH") or ""
    timestamp = int(epoch) if epoch.isdigit() else None
    op = llb.FileOp(
        stage.state,
        (llb.Mkdir(path, 0o755, make_parents=True, chown=owner, timestamp=timestamp),),
        name=name,
        location=cmd.location,
    )
    stage.state = op
    conv.commit(stage, f"WORKDIR {path}", op)


def upper_first(text: str) -> str:
    """The first word of `text` upper-cased (an instruction keyword as progress shows it)."""
    word, sep, rest = text.partition(" ")
    return word.upper() + sep + rest


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
