"""RUN: the command, its environment and history text (BuildKit's dispatchRun).

A mixin of the converter in convert.py; RUN --mount lowering belongs here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dockbuild import llb
from dockbuild.errors import DockerfileError
from dockbuild.frontend import instructions as ins

if TYPE_CHECKING:
    from dockbuild.frontend.convert import _Stage


class RunInstructions:
    def _do_run(self, stage: _Stage, cmd: ins.RunCommand, name: str) -> None:
        if cmd.mounts:
            raise DockerfileError("RUN --mount is not supported yet", location=cmd.location)
        if cmd.files:
            args = self._heredoc_run_args(stage, cmd)
        else:
            args = self._command_args(stage, cmd.cmd_line, cmd.prepend_shell)
        env_list = list(stage.config.get("Env") or [])
        env_keys = {e.partition("=")[0] for e in env_list}
        build_env = [
            f"{k}={v}"
            for k, v in stage.args.items()
            if v is not None and k not in env_keys and k not in _proxy_args()
        ]
        proxy_env = [
            f"{k}={v}" for k, v in self.opts.build_args.items() if k in _proxy_args() and k not in stage.args
        ]
        network = self.opts.network if cmd.network == "default" else cmd.network
        op = llb.ExecOp(
            mounts=(llb.Mount("/", stage.state, output=True),),
            args=tuple(args),
            env=tuple(env_list + build_env),
            cwd=stage.config.get("WorkingDir") or "/",
            user=stage.config.get("User") or "",
            network=network,
            security=cmd.security,
            proxy_env=tuple(proxy_env),
            name=name,
        )
        stage.state = op
        prefix = [f"|{len(build_env)}", *build_env] if build_env else []
        self._commit(stage, "RUN " + " ".join([*prefix, *args]) + " # buildkit", op)

    def _heredoc_run_args(self, stage: _Stage, cmd: ins.RunCommand) -> list[str]:
        shell = list(stage.config.get("Shell") or _default_shell())
        line = " ".join(cmd.cmd_line)
        if len(cmd.files) == 1 and line.strip().startswith("<<"):
            body = cmd.files[0].chomped_data
            if not body.startswith("#!"):
                return [*shell, body]
        # The line plus the heredocs, as the shell would read them from a script.
        script = line + "\n" + "".join(f"{h.chomped_data}{h.name}\n" for h in cmd.files)
        return [*shell, script]


def _default_shell() -> list[str]:
    from dockbuild.frontend.convert import DEFAULT_SHELL

    return DEFAULT_SHELL


def _proxy_args() -> set[str]:
    from dockbuild.frontend.convert import PROXY_ARGS

    return PROXY_ARGS
