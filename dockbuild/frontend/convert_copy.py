"""COPY and ADD: sources, destination rules, --from, --chown/--chmod, heredoc files
(BuildKit's convert_copy.go). A mixin of the converter in convert.py.
"""

from __future__ import annotations

import posixpath
import re
from typing import TYPE_CHECKING

from dockbuild import llb
from dockbuild.errors import DockerfileError, Location
from dockbuild.frontend import instructions as ins
from dockbuild.frontend.shell import Lex, ShellError

if TYPE_CHECKING:
    from dockbuild.frontend.convert import _Stage


class CopyInstructions:
    def _do_copy(self, stage: _Stage, cmd: ins.CopyCommand, name: str) -> None:
        self._copy(stage, cmd, name, "COPY")

    def _do_add(self, stage: _Stage, cmd: ins.AddCommand, name: str) -> None:
        for src in cmd.sources:
            if "://" in src or src.startswith("git@"):
                raise DockerfileError("ADD from a URL or git is not supported yet", location=cmd.location)
        self._copy(stage, cmd, name, "ADD")

    def _copy(self, stage: _Stage, cmd: ins.CopyCommand, name: str, verb: str) -> None:
        env = self._stage_env(stage)
        loc = cmd.location
        sources = [self._expand(s, env, loc) for s in cmd.sources]
        dest = self._expand(cmd.dest, env, loc)
        heredocs = list(cmd.heredoc_sources)
        n_sources = len(sources) + len(heredocs)
        if n_sources > 1 and not dest.endswith("/"):
            raise DockerfileError(
                f"When using {verb} with more than one source file, "
                "the destination must be a directory and end with a /",
                location=loc,
            )
        workdir = stage.config.get("WorkingDir") or "/"
        abs_dest = posixpath.join(workdir, dest)
        if (dest.endswith("/") or dest in (".", "./")) and not abs_dest.endswith("/"):
            abs_dest += "/"
        chown = self._chown(cmd.chown, env, loc) if cmd.chown else None
        chmod = self._expand(cmd.chmod, env, loc) if cmd.chmod else ""
        if chmod and not _valid_chmod(chmod):
            raise DockerfileError(f"invalid chmod parameter: {chmod!r}", location=loc)
        source_op = self._copy_source(stage, cmd)
        actions: list[llb.FileAction] = []
        for src in sources:
            actions.append(
                llb.Copy(
                    source=source_op,
                    src=src,
                    dest=abs_dest,
                    chown=chown,
                    mode=chmod,
                    exclude=tuple(self._expand(e, env, loc) for e in cmd.exclude),
                    parents=getattr(cmd, "parents", False),
                )
            )
        for doc in heredocs:
            data = doc.data
            if doc.expand:
                data = self._expand_heredoc(data, env, loc)
            path = abs_dest + doc.path if abs_dest.endswith("/") else abs_dest
            actions.append(
                llb.Mkfile(path, data.encode(), int(chmod, 8) if chmod.isdigit() else 0o644, chown)
            )
        op = llb.FileOp(stage.state, tuple(actions), name=name)
        stage.state = op
        shown = " ".join([*sources, *(f"<<{h.path}" for h in heredocs)])
        self._commit(stage, f"{verb} {shown} {dest} # buildkit", op)

    def _expand_heredoc(self, data: str, env: dict[str, str], loc: Location) -> str:
        lex = Lex(self.result.escape_token)
        lex.skip_process_quotes = True
        lex.raw_escapes = True
        try:
            return lex.process_word(data, env)
        except ShellError as e:
            raise DockerfileError(str(e), location=loc) from None

    def _copy_source(self, stage: _Stage, cmd: ins.CopyCommand) -> llb.Op | None:
        if not cmd.from_:
            return self.context
        ref = self._expand(cmd.from_, {k: v for k, v in self.global_args.items() if v is not None}, cmd.location)
        named = self.resolve_named(ref)
        if named is not None:
            if named.kind == "local":
                return llb.SourceOp(named.identifier, name=f"[internal] load build context {ref}")
            return llb.SourceOp(named.identifier, platform=self.opts.platform, name=f"[{ref}] FROM {named.name}")
        dep = self._stage_by_ref(ref)
        if dep is not None:
            if dep is stage:
                raise DockerfileError(f"circular dependency detected on stage: {ref}", location=cmd.location)
            return dep.state
        named = self.resolve_image(ref)
        return llb.SourceOp(named.identifier, platform=self.opts.platform, name=f"[{ref}] FROM {named.name}")

    def _chown(self, text: str, env: dict[str, str], loc: Location) -> llb.Chown:
        value = self._expand(text, env, loc)
        user, _, group = value.partition(":")
        if not user:
            raise DockerfileError(f"invalid chown {value!r}", location=loc)
        return llb.Chown(user, group)


def _valid_chmod(spec: str) -> bool:
    if spec.isdigit():
        return all(c in "01234567" for c in spec) and len(spec) <= 4
    return re.fullmatch(r"([ugoa]*[-+=]([rwxXst]*|[ugo]))+(,([ugoa]*[-+=]([rwxXst]*|[ugo]))+)*", spec) is not None
