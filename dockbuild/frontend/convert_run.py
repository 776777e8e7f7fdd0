"""RUN: the command, its environment, its mounts and history text (BuildKit's dispatchRun
and convert_runmount.go)."""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING

from dockbuild import llb
from dockbuild.errors import DockerfileError
from dockbuild.frontend import instructions as ins
from dockbuild.frontend.convert_config import DEFAULT_SHELL, command_args
from dockbuild.frontend.mounts import parse_mount
from dockbuild.frontend.stages import StageState

if TYPE_CHECKING:
    from dockbuild.frontend.convert import Converter

_PIPES = "/dev/pipes"  # where a RUN heredoc with a shebang is mounted, as in BuildKit
PROXY_ARGS = {
    name
    for base in ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
    for name in (base, base.lower())
}


def run(conv: Converter, stage: StageState, cmd: ins.RunCommand, name: str) -> None:
    mounts = _run_mounts(conv, stage, cmd)
    if cmd.files:
        args = _heredoc_run_args(stage, cmd)
    else:
        args = command_args(stage, cmd.cmd_line, cmd.prepend_shell)
    if stage.run_env is None:
        stage.run_env = tuple(stage.env_pairs.values())
    env = stage.run_env
    # As BuildKit's proxyEnvFromBuildArgs and the executor's proxyEnvList: a proxy
    # build arg in either case sets both spellings (keys sorted: the lower-case one wins).
    proxies = {
        k.upper(): v for k, v in sorted(conv.opts.build_args.items()) if k in PROXY_ARGS
    }
    proxy_env = tuple(
        f"{name}={v}"
        for base, v in proxies.items()
        for name in (base, base.lower())
        if name not in stage.args
    )
    ssh = [m for m in mounts if m.type == "ssh"]
    if ssh and "SSH_AUTH_SOCK" not in stage.env:
        # As BuildKit's llb.AddSSHSocket: the first agent socket is the default one.
        env = (*env, f"SSH_AUTH_SOCK={ssh[0].target}")
    network = conv.opts.network if cmd.network == "default" else cmd.network
    op = llb.ExecOp(
        mounts=(llb.Mount("/", stage.state, output=True), *mounts),
        args=tuple(args),
        env=env,
        cwd=stage.config.get("WorkingDir") or "/",
        user=stage.config.get("User") or "",
        network=network,
        security=cmd.security,
        proxy_env=proxy_env,
        hostname=conv.opts.build_args.get("BUILDKIT_SANDBOX_HOSTNAME") or "buildkitsandbox",
        extra_hosts=conv.opts.extra_hosts,
        shm_size=conv.opts.shm_size,
        platform="" if stage.platform == conv.opts.build_platform else stage.platform,
        name=name,
        location=cmd.location,
    )
    stage.state = op
    # BuildKit's runCommandString: `|N K=v ...` before the command when ARGs are in scope.
    shown = stage.arg_pairs
    prefix = f"|{len(shown)} " + " ".join(shown.values()) + " " if shown else ""
    conv.commit(stage, "RUN " + prefix + " ".join(args) + " # buildkit", op)


def _run_mounts(conv: Converter, stage: StageState, cmd: ins.RunCommand) -> list[llb.Mount]:
    """RUN --mount flags as LLB mounts (BuildKit's dispatchRunMounts)."""
    env = stage.env
    workdir = stage.config.get("WorkingDir") or "/"
    namespace = conv.opts.build_args.get("BUILDKIT_CACHE_MOUNT_NS", "")
    mounts: list[llb.Mount] = []
    ssh_count = 0
    for raw, parsed in zip(cmd.mount_specs, cmd.mounts, strict=True):
        spec = parsed
        if parsed.deferred:  # it holds variables or quotes: parse it again, expanded
            try:
                spec = parse_mount(raw, lambda word: conv.expand(word, env, cmd.location))
            except DockerfileError as e:
                e.location = e.location or cmd.location
                raise
        target = spec.target
        if target and not target.startswith("/"):
            target = posixpath.join("/", workdir, target)
        target = posixpath.normpath(target) if target else ""
        if spec.type in ("bind", "cache", "tmpfs") and not target:
            raise DockerfileError(
                f"--mount={raw}: mount type {spec.type} requires a target",
                location=cmd.location,
            )
        if target == "/":
            raise DockerfileError(
                f"--mount={raw}: cannot mount over the root filesystem", location=cmd.location
            )
        if spec.type == "bind":
            source = conv.copy_source(stage, spec.from_, cmd.location)
            mounts.append(
                llb.Mount(
                    target,
                    source,
                    selector=_clean(spec.source),
                    type="bind",
                    readonly=spec.read_only,
                )  # fmt: skip
            )
        elif spec.type == "cache":
            source = conv.copy_source(stage, spec.from_, cmd.location) if spec.from_ else None
            cache_id = spec.id or target
            if namespace:
                cache_id = f"{namespace}/{cache_id}"
            mounts.append(
                llb.Mount(
                    target,
                    source,
                    selector=_clean(spec.source) if source else "",
                    type="cache",
                    readonly=spec.read_only,
                    cache_id=cache_id,
                    sharing=spec.sharing or "shared",
                    mode=spec.mode,
                    uid=spec.uid,
                    gid=spec.gid,
                )  # fmt: skip
            )
        elif spec.type == "tmpfs":
            mounts.append(llb.Mount(target, type="tmpfs", readonly=spec.read_only, size=spec.size))
        elif spec.type == "secret":
            secret_id = spec.id or spec.source or posixpath.basename(target)
            if not target and spec.env is None:
                target = "/run/secrets/" + secret_id
            mounts.append(
                llb.Mount(
                    target,
                    type="secret",
                    readonly=True,
                    secret_id=secret_id,
                    required=spec.required,
                    mode=0o400 if spec.mode is None else spec.mode,
                    uid=spec.uid or 0,
                    gid=spec.gid or 0,
                    env=spec.env or "",
                )  # fmt: skip
            )
        elif spec.type == "ssh":
            if not target:
                target = f"/run/buildkit/ssh_agent.{ssh_count}"
            ssh_count += 1
            mounts.append(
                llb.Mount(
                    target,
                    type="ssh",
                    readonly=True,
                    secret_id=spec.id or "default",
                    required=spec.required,
                    mode=0o600 if spec.mode is None else spec.mode,
                    uid=spec.uid or 0,
                    gid=spec.gid or 0,
                )  # fmt: skip
            )
    heredoc = cmd.single_heredoc
    if heredoc is not None and heredoc.chomped_data.startswith("#!"):
        # BuildKit writes a shebang heredoc to a file and runs that file.
        script = llb.FileOp(
            None,
            (
                llb.Mkfile(
                    "/" + heredoc.name,
                    heredoc.chomped_data.encode(errors="surrogateescape"),
                    0o755,
                ),
            ),
            name="[internal] preparing inline document",
        )
        mounts.append(llb.Mount(_PIPES, script, selector="/", type="bind", readonly=True))
    return mounts


def _heredoc_run_args(stage: StageState, cmd: ins.RunCommand) -> list[str]:
    shell = list(stage.config.get("Shell") or DEFAULT_SHELL)
    heredoc = cmd.single_heredoc
    if heredoc is not None:
        body = heredoc.chomped_data
        # With a shebang the body is a file mounted at /dev/pipes (see _run_mounts).
        return [*shell, posixpath.join(_PIPES, heredoc.name) if body.startswith("#!") else body]
    # The line plus the raw heredocs, as the shell reads them from a script (BuildKit
    # joins them exactly so: no newline after the last delimiter).
    line = " ".join(cmd.cmd_line)
    return [*shell, line + "".join(f"\n{h.data}{h.name}" for h in cmd.files)]


def _clean(path: str) -> str:
    """A selector inside a mount source: relative, normalised, "" for the root."""
    cleaned = posixpath.normpath("/" + path).lstrip("/")
    return "" if cleaned == "." else cleaned
