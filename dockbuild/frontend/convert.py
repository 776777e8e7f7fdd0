"""Dockerfile -> LLB: stages, ARG scoping, the image config and history, as BuildKit builds them.

Pure: the only way out is the two resolver callbacks the caller passes in (a named
context or a registry image -> a pinned identifier and its config), so this module runs
without a container runtime, a registry or a cache.
"""

from __future__ import annotations

import copy
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dockbuild import llb
from dockbuild.errors import DockerfileError, Location
from dockbuild.frontend import instructions as ins
from dockbuild.frontend import parser
from dockbuild.frontend.convert_copy import CopyInstructions
from dockbuild.frontend.convert_run import RunInstructions
from dockbuild.frontend.shell import Lex, ShellError

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SHELL = ["/bin/sh", "-c"]
PROXY_ARGS = {
    name
    for base in ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
    for name in (base, base.lower())
}


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
    exclude_patterns: tuple[str, ...] = ()
    dockerfile_name: str = "Dockerfile"


@dataclass
class Definition:
    root: llb.Op | None
    image_config: dict[str, Any]
    # One entry per history entry: the op whose layer it describes (its empty_layer is
    # known only once solved), or None to keep the entry as it is.
    history_ops: list[llb.Op | None]
    warnings: list[str]


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
    cmd_set: bool = False
    done: bool = False


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
        self.resolve_named = resolve_named
        self.resolve_image = resolve_image
        self.result = parser.parse(text, filename=options.dockerfile_name)
        self.lex = Lex(self.result.escape_token)
        self.warnings = [f"WARNING: {w.short}: {w.detail} (line {w.line})" for w in self.result.warnings]
        specs, meta_args = ins.parse_stages(self.result)
        self.stages = [_Stage(spec) for spec in specs]
        self.used_args: set[str] = set()
        self.global_args = self._global_args(meta_args)
        self.context = llb.SourceOp(
            "local://context",
            attrs=(("exclude", "\n".join(options.exclude_patterns)),)
            if options.exclude_patterns
            else (),
            name="[internal] load build context",
        )

    # -- scopes ------------------------------------------------------------------------

    def _platform_args(self) -> dict[str, str]:
        os_, _, rest = self.opts.platform.partition("/")
        arch, _, variant = rest.partition("/")
        out = {}
        for prefix in ("BUILD", "TARGET"):
            out[f"{prefix}PLATFORM"] = self.opts.platform
            out[f"{prefix}OS"] = os_
            out[f"{prefix}ARCH"] = arch
            out[f"{prefix}VARIANT"] = variant
        return out

    def _global_args(self, meta_args: list[ins.ArgCommand]) -> dict[str, str | None]:
        scope: dict[str, str | None] = dict(self._platform_args())
        target = self._target_stage()
        scope["TARGETSTAGE"] = target.spec.name or ""
        for cmd in meta_args:
            for key, default in cmd.args:
                if key in self.opts.build_args:
                    scope[key] = self.opts.build_args[key]
                    self.used_args.add(key)
                elif default is not None:
                    scope[key] = self._expand(default, _defined(scope), cmd.location)
                else:
                    scope[key] = None
        return scope

    def _expand(self, word: str, env: dict[str, str], location: Location) -> str:
        try:
            return self.lex.process_word(word, env)
        except ShellError as e:
            raise DockerfileError(str(e), location=location) from None

    def _expand_words(self, word: str, env: dict[str, str], location: Location) -> list[str]:
        try:
            return self.lex.process_words(word, env)
        except ShellError as e:
            raise DockerfileError(str(e), location=location) from None

    @staticmethod
    def _stage_env(stage: _Stage) -> dict[str, str]:
        """Expansion scope inside a stage: ARGs, then ENV (which wins)."""
        env = _defined(stage.args)
        env.update(_env_dict(stage.config.get("Env") or []))
        return env

    # -- stage graph -------------------------------------------------------------------

    def _target_stage(self) -> _Stage:
        if not self.stages:
            raise DockerfileError("file with no instructions", location=Location(self.opts.dockerfile_name, 1))
        if self.opts.target is None:
            return self.stages[-1]
        for st in self.stages:
            if st.spec.name and st.spec.name == self.opts.target.lower():
                return st
        raise DockerfileError(f'target stage "{self.opts.target}" could not be found')

    def _stage_by_name(self, name: str) -> _Stage | None:
        """FROM names a stage by its (case-insensitive) name only."""
        low = name.lower()
        for st in self.stages:
            if st.spec.name and st.spec.name == low:
                return st
        return None

    def _stage_by_ref(self, ref: str) -> _Stage | None:
        """--from names a stage by name or by index."""
        if ref.isdigit() and int(ref) < len(self.stages):
            return self.stages[int(ref)]
        return self._stage_by_name(ref)

    def _base_name(self, stage: _Stage) -> str:
        return self._expand(stage.spec.base_name, _defined(self.global_args), stage.spec.location)

    def _deps(self, stage: _Stage) -> list[_Stage]:
        deps = []
        base = self._stage_by_name(self._base_name(stage))
        if base is not None:
            deps.append(base)
        for cmd in stage.spec.commands:
            for ref in _from_refs(cmd):
                name = self._expand(ref, _defined(self.global_args), cmd.location)
                dep = self._stage_by_ref(name)
                if dep is not None:
                    deps.append(dep)
        return deps

    def _order(self, target: _Stage) -> list[_Stage]:
        """The stages ``target`` needs, dependencies first; a cycle is an error."""
        order: list[_Stage] = []
        state: dict[int, str] = {}

        def visit(st: _Stage) -> None:
            mark = state.get(st.spec.index)
            if mark == "done":
                return
            if mark == "active":
                raise DockerfileError(
                    f"circular dependency detected on stage: {st.spec.name or st.spec.index}",
                    location=st.spec.location,
                )
            state[st.spec.index] = "active"
            for dep in self._deps(st):
                visit(dep)
            state[st.spec.index] = "done"
            order.append(st)

        visit(target)
        return order

    # -- conversion ----------------------------------------------------------------------

    def run(self) -> Definition:
        target = self._target_stage()
        for stage in self._order(target):
            self._convert_stage(stage)
        unused = sorted(
            k for k in self.opts.build_args if k not in self.used_args and k not in PROXY_ARGS
        )
        if unused:
            self.warnings.append(
                f"WARNING: One or more build-args {unused} were not consumed".replace("'", "")
            )
        config = dict(target.config)
        labels = dict(config.get("Labels") or {})
        labels.update(self.opts.labels)
        if labels:
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
        return Definition(target.state, image, list(target.history_ops), self.warnings)

    def _step_name(self, stage: _Stage, step: int, text: str) -> str:
        total = len(stage.spec.commands) + 1
        if len(self.stages) == 1:
            prefix = ""
        else:
            prefix = (stage.spec.name or f"stage-{stage.spec.index}") + " "
        return f"[{prefix}{step}/{total}] {text}"

    def _convert_stage(self, stage: _Stage) -> None:
        spec = stage.spec
        base_name = self._base_name(stage)
        from_text = f"FROM {base_name}"
        base_stage = self._stage_by_name(base_name)
        if base_stage is not None and base_stage is not stage and base_stage.done:
            stage.state = base_stage.state
            stage.config = copy.deepcopy(base_stage.config)
            stage.image = copy.deepcopy(base_stage.image)
            stage.history = copy.deepcopy(base_stage.history)
            stage.history_ops = list(base_stage.history_ops)
            stage.args = dict(base_stage.args)
        elif base_name == "scratch":
            stage.config = {"Env": [DEFAULT_PATH]}
        else:
            named = self.resolve_named(base_name)
            if named is None:
                named = self.resolve_image(base_name)
            if named.kind != "image":
                raise DockerfileError(
                    f"FROM {base_name}: a local directory context cannot be a base image",
                    location=spec.location,
                )
            from_text = f"FROM {named.name}"
            stage.state = llb.SourceOp(
                named.identifier,
                platform=self.opts.platform,
                name=self._step_name(stage, 1, from_text),
            )
            self._from_image(stage, named.config or {})
        stage.config.setdefault("Env", [])
        if not any(e.startswith("PATH=") for e in stage.config["Env"]):
            stage.config["Env"].insert(0, DEFAULT_PATH)
        for step, cmd in enumerate(spec.commands, start=2):
            self._dispatch(stage, cmd, step)
        stage.done = True

    def _from_image(self, stage: _Stage, config: dict[str, Any]) -> None:
        stage.config = copy.deepcopy(config.get("config") or {})
        for key in ("author",):
            if key in config:
                stage.image[key] = config[key]
        stage.history = copy.deepcopy(config.get("history") or [])
        stage.history_ops = [None] * len(stage.history)

    def _commit(self, stage: _Stage, created_by: str, op: llb.Op | None = None) -> None:
        """Record a history entry; ``op`` is the step whose layer it describes."""
        entry: dict[str, Any] = {"created_by": created_by, "comment": "buildkit.dockerfile.v0"}
        if op is None:
            entry["empty_layer"] = True
        stage.history.append(entry)
        stage.history_ops.append(op)

    def _dispatch(self, stage: _Stage, cmd: ins.Instruction, step: int) -> None:
        name = self._step_name(stage, step, " ".join(cmd.original.split()))
        handler = getattr(self, "_do_" + type(cmd).__name__.removesuffix("Command").lower(), None)
        if handler is None:
            raise DockerfileError(
                f"{type(cmd).__name__.removesuffix('Command').upper()} is not supported yet",
                location=cmd.location,
            )
        handler(stage, cmd, name)

    # -- metadata instructions ----------------------------------------------------------

    def _do_env(self, stage: _Stage, cmd: ins.EnvCommand, name: str) -> None:
        env = self._stage_env(stage)  # every pair sees the values from before this ENV
        pairs = [
            (self._expand(k, env, cmd.location), self._expand(v, env, cmd.location))
            for k, v in cmd.env
        ]
        current = stage.config.setdefault("Env", [])
        for key, value in pairs:
            _set_env(current, key, value)
        self._commit(stage, "ENV " + " ".join(f"{k}={v}" for k, v in pairs))

    def _do_arg(self, stage: _Stage, cmd: ins.ArgCommand, name: str) -> None:
        parts = []
        for key, default in cmd.args:
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
            parts.append(key if default is None else f"{key}={default}")
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

    def _do_cmd(self, stage: _Stage, cmd: ins.CmdCommand, name: str) -> None:
        args = self._command_args(stage, cmd.cmd_line, cmd.prepend_shell)
        stage.config["Cmd"] = args
        if cmd.prepend_shell:
            stage.config["ArgsEscaped"] = True
        stage.cmd_set = True
        self._commit(stage, f"CMD {_go_quote_list(args)}")

    def _do_entrypoint(self, stage: _Stage, cmd: ins.EntrypointCommand, name: str) -> None:
        args = self._command_args(stage, cmd.cmd_line, cmd.prepend_shell)
        stage.config["Entrypoint"] = args
        if cmd.prepend_shell:
            stage.config["ArgsEscaped"] = True
        if not stage.cmd_set:
            stage.config["Cmd"] = None
        self._commit(stage, f"ENTRYPOINT {_go_quote_list(args)}")

    def _do_shell(self, stage: _Stage, cmd: ins.ShellCommand, name: str) -> None:
        stage.config["Shell"] = list(cmd.shell)
        self._commit(stage, f"SHELL {_go_quote_list(list(cmd.shell))}")

    def _do_expose(self, stage: _Stage, cmd: ins.ExposeCommand, name: str) -> None:
        env = self._stage_env(stage)
        ports = stage.config.setdefault("ExposedPorts", {}) or {}
        stage.config["ExposedPorts"] = ports
        added = []
        for raw in cmd.ports:
            for word in self._expand_words(raw, env, cmd.location):
                for port in _expand_port(word, cmd.location):
                    ports[port] = {}
                    added.append(port)
        self._commit(stage, "EXPOSE " + " ".join(sorted(added)))

    def _do_volume(self, stage: _Stage, cmd: ins.VolumeCommand, name: str) -> None:
        env = self._stage_env(stage)
        vols = stage.config.setdefault("Volumes", {}) or {}
        stage.config["Volumes"] = vols
        added = []
        for raw in cmd.volumes:
            v = self._expand(raw, env, cmd.location)
            if not v.strip():
                raise DockerfileError("VOLUME specified can not be an empty string", location=cmd.location)
            vols[v] = {}
            added.append(v)
        self._commit(stage, f"VOLUME {_go_quote_list(added)}")

    def _do_stopsignal(self, stage: _Stage, cmd: ins.StopSignalCommand, name: str) -> None:
        sig = self._expand(cmd.signal, self._stage_env(stage), cmd.location)
        stage.config["StopSignal"] = sig
        self._commit(stage, f"STOPSIGNAL {sig}")

    def _do_healthcheck(self, stage: _Stage, cmd: ins.HealthcheckCommand, name: str) -> None:
        health: dict[str, Any] = {"Test": list(cmd.test)}
        for key, value in (
            ("Interval", cmd.interval),
            ("Timeout", cmd.timeout),
            ("StartPeriod", cmd.start_period),
            ("StartInterval", cmd.start_interval),
            ("Retries", cmd.retries),
        ):
            if value:
                health[key] = value
        stage.config["Healthcheck"] = health
        self._commit(stage, "HEALTHCHECK " + json.dumps(stage.config["Healthcheck"]["Test"]))

    def _do_onbuild(self, stage: _Stage, cmd: ins.OnbuildCommand, name: str) -> None:
        triggers = stage.config.setdefault("OnBuild", []) or []
        stage.config["OnBuild"] = triggers
        triggers.append(cmd.expression)
        self._commit(stage, f"ONBUILD {cmd.expression}")

    # -- filesystem instructions -----------------------------------------------------------

    def _do_workdir(self, stage: _Stage, cmd: ins.WorkdirCommand, name: str) -> None:
        path = self._expand(cmd.path, self._stage_env(stage), cmd.location)
        path = posixpath.normpath(posixpath.join(stage.config.get("WorkingDir") or "/", path))
        stage.config["WorkingDir"] = path
        op = llb.FileOp(stage.state, (llb.Mkdir(path, 0o755, make_parents=True),), name=name)
        stage.state = op
        self._commit(stage, f"WORKDIR {path}", op)


# -- helpers -------------------------------------------------------------------------------


def _defined(scope: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in scope.items() if v is not None}


def _env_dict(env: list[str]) -> dict[str, str]:
    out = {}
    for item in env:
        k, _, v = item.partition("=")
        out[k] = v
    return out


def _set_env(env: list[str], key: str, value: str) -> None:
    for i, item in enumerate(env):
        if item.partition("=")[0] == key:
            env[i] = f"{key}={value}"
            return
    env.append(f"{key}={value}")


def _go_quote_list(items: list[str]) -> str:
    """Go's %q of a []string: ["a" "b"] (how BuildKit writes CMD/ENTRYPOINT history)."""
    return "[" + " ".join(json.dumps(i, ensure_ascii=False) for i in items) + "]"


def _from_refs(cmd: ins.Instruction) -> list[str]:
    ref = getattr(cmd, "from_", None)
    refs = [ref] if ref else []
    for mount in getattr(cmd, "mounts", None) or []:
        src = getattr(mount, "from_", None)
        if src:
            refs.append(src)
    return refs


def _expand_port(word: str, loc: Location) -> list[str]:
    port, _, proto = word.partition("/")
    proto = (proto or "tcp").lower()
    if ":" in port:
        port = port.rsplit(":", 1)[1]
    lo, _, hi = port.partition("-")
    if not lo.isdigit() or (hi and not hi.isdigit()):
        raise DockerfileError(f"invalid containerPort: {port}", location=loc)
    if not hi:
        return [f"{int(lo)}/{proto}"]
    return [f"{p}/{proto}" for p in range(int(lo), int(hi) + 1)]
