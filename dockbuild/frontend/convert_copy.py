"""COPY and ADD: sources (context, stages, images, HTTP, git, local archives), destination
rules, --from, --chown/--chmod, --link, --parents, --exclude, heredoc files (BuildKit's
convert_copy.go).
"""

from __future__ import annotations

import posixpath
import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from dockbuild import llb
from dockbuild.errors import DockerfileError, Location
from dockbuild.frontend import instructions as ins
from dockbuild.frontend.goformat import go_quote
from dockbuild.frontend.shell import Lex, ShellError
from dockbuild.frontend.stages import StageState
from dockbuild.gitref import GitRef, parse_git_ref

if TYPE_CHECKING:
    from dockbuild.frontend.convert import Converter


def git_source(
    ref: GitRef, keep_git_dir: bool, checksum: str, name: str, epoch: bool = False
) -> llb.SourceOp:
    attrs = [("ref", ref.ref), ("subdir", ref.subdir)]
    # As BuildKit (git.mtime): files get the checkout time, or the commit time with
    # ?mtime=commit or when SOURCE_DATE_EPOCH is set.
    if (ref.mtime or ("commit" if epoch else "checkout")) == "commit":
        attrs.append(("mtime", "commit"))
    if keep_git_dir:
        attrs.append(("keep_git_dir", "true"))
    if checksum:
        attrs.append(("checksum", checksum))
    if not ref.submodules:
        attrs.append(("submodules", "false"))
    return llb.SourceOp("git://" + ref.remote, attrs=tuple(attrs), name=name)


def copy(conv: Converter, stage: StageState, cmd: ins.CopyCommand, name: str) -> None:
    _copy(conv, stage, cmd, name, "COPY")


def add(conv: Converter, stage: StageState, cmd: ins.AddCommand, name: str) -> None:
    _copy(conv, stage, cmd, name, "ADD")


def _copy(
    conv: Converter, stage: StageState, cmd: ins.CopyCommand | ins.AddCommand, name: str, verb: str
) -> None:
    env = stage.env
    loc = cmd.location
    is_add = verb == "ADD"
    sources = [conv.expand(s, env, loc) for s in cmd.sources]
    dest = conv.expand(cmd.dest, env, loc)
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
    chown_text = conv.expand(cmd.chown, env, loc) if cmd.chown else ""
    chown = _chown(chown_text, loc) if chown_text else None
    chmod = conv.expand(cmd.chmod, env, loc) if cmd.chmod else ""
    if chmod and not _valid_chmod(chmod):
        raise DockerfileError(
            f"invalid chmod parameter: '{chmod}'. it should be octal string and between 0 and 07777",
            location=loc,
        )
    exclude = tuple(conv.expand(e, env, loc) for e in cmd.exclude)
    from_, parents, checksum = "", False, ""
    keep_git_dir: bool | None = None
    unpack: bool | None = None
    if isinstance(cmd, ins.AddCommand):
        checksum = conv.expand(cmd.checksum, env, loc) if cmd.checksum else ""
        keep_git_dir, unpack = cmd.keep_git_dir, cmd.unpack
    else:
        from_, parents = cmd.from_, cmd.parents
    if checksum:
        if len(sources) != 1:
            raise DockerfileError("checksum can't be specified for multiple sources", location=loc)
        if not sources[0].startswith(("http://", "https://", "git@", "git://", "ssh://")):
            raise DockerfileError("checksum requires HTTP(S) or Git sources", location=loc)
    actions: list[llb.FileAction] = []
    context_source: llb.Op | None = None
    context_resolved = False
    for src in sources:
        try:
            git = parse_git_ref(src)
        except ValueError as e:
            raise DockerfileError(str(e), location=loc) from None
        if git is not None:
            if not is_add:
                raise DockerfileError("source can't be a git ref for COPY", location=loc)
            if (
                keep_git_dir is not None
                and git.keep_git_dir is not None
                and keep_git_dir != git.keep_git_dir
            ):
                raise DockerfileError("inconsistent keep-git-dir configuration", location=loc)
            keep = git.keep_git_dir if git.keep_git_dir is not None else bool(keep_git_dir)
            if checksum and git.checksum and checksum != git.checksum:
                raise DockerfileError(
                    f'checksum mismatch "{checksum}" != "{git.checksum}"', location=loc
                )
            source = git_source(
                git,
                keep,
                git.checksum or checksum,
                src,
                epoch=bool(conv.opts.build_args.get("SOURCE_DATE_EPOCH")),
            )
            actions.append(
                llb.Copy(
                    source=source, src="/", dest=abs_dest, chown=chown, mode=chmod, exclude=exclude
                )
            )
            continue
        if src.startswith(("http://", "https://")):
            if not is_add:
                raise DockerfileError("source can't be a URL for COPY", location=loc)
            if checksum and not re.fullmatch(r"sha256:[0-9a-f]{64}", checksum):
                # BuildKit's messages (go-digest Parse) first, then what dockbuild takes.
                algo, sep, _ = checksum.partition(":")
                reason = (
                    "invalid checksum digest format"
                    if not sep or not algo
                    else "unsupported digest algorithm"
                    if algo not in ("sha256", "sha384", "sha512")
                    else "invalid checksum digest format"
                    if algo == "sha256"
                    else "unsupported digest algorithm (dockbuild verifies sha256 only)"
                )
                raise DockerfileError(
                    f"{reason}: {checksum!r}: expected sha256:<64 hex digits>",
                    location=loc,
                )
            base = posixpath.basename(urlsplit(src).path)
            filename = base if base not in ("", ".", "/") else "__unnamed__"
            attrs = [("filename", filename)]
            if checksum:
                attrs.append(("checksum", checksum))
            source = llb.SourceOp(src, attrs=tuple(attrs), name=src)
            actions.append(
                llb.Copy(
                    source=source,
                    src=filename,
                    dest=abs_dest,
                    chown=chown,
                    mode=chmod,
                    exclude=exclude,
                    attempt_unpack=bool(unpack),
                )
            )
            continue
        if not from_:
            _check_ignored(conv, verb, src, loc)
        if not context_resolved:
            context_source = conv.copy_source(stage, from_, loc)
            context_resolved = True
        include: tuple[str, ...] = ()
        if parents:
            pivot, sep, pattern = src.partition("/./")
            if not sep:
                pivot, pattern = "/", src
            include = (posixpath.normpath("/" + pattern).lstrip("/"),)
            src = pivot
        actions.append(
            llb.Copy(
                source=context_source,
                src=src,
                dest=abs_dest,
                chown=chown,
                mode=chmod,
                exclude=exclude,
                parents=parents,
                include=include,
                allow_empty_wildcard=True,
                attempt_unpack=is_add if unpack is None else unpack,
            )
        )
    for doc in heredocs:
        data = doc.data
        if doc.expand:
            data = _expand_heredoc(conv, data, env, loc)
        path = abs_dest + doc.path if abs_dest.endswith("/") else abs_dest
        if chmod.isdigit():
            # As fsutil's MkdirAll in BuildKit's copy of the document: the parent
            # directories the copy creates take the octal mode too.
            parts = path.strip("/").split("/")[:-1]
            actions.extend(
                llb.Mkdir("/" + "/".join(parts[: i + 1]), int(chmod, 8) & 0o777, True, chown)
                for i in range(len(parts))
            )
        actions.append(
            llb.Mkfile(path, data.encode(), int(chmod, 8) if chmod.isdigit() else 0o644, chown)
        )
    flags = "".join(
        f" {flag}"
        for flag, on in (
            ("--parents", parents),
            (f"--chown={chown_text}", bool(chown_text)),
            (f"--chmod={chmod}", bool(chmod)),
        )
        if on
    )
    shown = " ".join([*sources, *(f"<<{h.path}" for h in heredocs)])
    created_by = f"{verb}{flags} {shown} {dest} # buildkit"
    # --link: the files go into a layer of their own on scratch, merged onto the
    # stage, so the layer never depends on what is below it. As in BuildKit, not
    # with --chmod (that copy is made on the stage).
    if cmd.link and not chmod:
        # Scratch has no /etc/passwd to resolve names in: BuildKit refuses --chown by
        # name with --link (moby/buildkit#7134); numeric ids and "root" work.
        if chown is not None and not all(
            part.isdigit() or part == "root" for part in (chown.user, chown.group) if part
        ):
            raise DockerfileError(
                f"COPY --link --chown={chown_text}: user and group names cannot be resolved "
                "with --link (the files are copied onto an empty layer, without /etc/passwd "
                "or /etc/group); use numeric ids",
                location=cmd.location,
            )
        layer = llb.FileOp(None, tuple(actions), name=name)
        merge = llb.MergeOp((stage.state, layer), name=name)
        stage.state = merge
        stage.ops.append(merge)
        conv.commit(stage, created_by, layer)
        return
    op = llb.FileOp(stage.state, tuple(actions), name=name, location=cmd.location)
    stage.state = op
    conv.commit(stage, created_by, op)


def _check_ignored(conv: Converter, verb: str, src: str, loc: Location) -> None:
    """CopyIgnoredFile (experimental): a context source that .dockerignore excludes. As
    in BuildKit, not checked when the patterns have `!` exceptions (too hard to judge
    statically)."""
    is_ignored = conv.opts.is_ignored
    if is_ignored is None or not conv.linter.enabled("CopyIgnoredFile"):
        return
    if any(p.startswith("!") for p in conv.opts.exclude_patterns):
        return
    path = posixpath.normpath(src)
    if path in (".", "/") and not any(
        p in ("*", "**", "**/*") for p in conv.opts.exclude_patterns
    ):
        return  # a context root is ignored only by a pattern for every entry (copySourceRootIgnored)
    if is_ignored(path):
        conv.linter.run(
            "CopyIgnoredFile",
            f"Attempting to {verb.capitalize()} file {go_quote(path)} that is excluded by "
            ".dockerignore",
            loc,
        )


def _expand_heredoc(conv: Converter, data: str, env: dict[str, str], loc: Location) -> str:
    """A document under an unquoted delimiter, as BuildKit's ExpandRaw: variables are
    expanded, quotes kept, and each backslash escape dropped (``\\$`` is ``$``, ``\\\\`` is
    ``\\``), with the backslash whatever the escape directive says."""
    lex = Lex("\\")
    lex.skip_process_quotes = True
    try:
        return lex.process_word(data, env)
    except ShellError as e:
        raise DockerfileError(str(e), location=loc) from None


def _chown(value: str, loc: Location) -> llb.Chown:
    user, _, group = value.partition(":")
    if not user:
        raise DockerfileError(f"invalid chown {value!r}", location=loc)
    return llb.Chown(user, group)


def _valid_chmod(spec: str) -> bool:
    if spec.isdigit():
        return all(c in "01234567" for c in spec) and int(spec, 8) <= 0o7777
    return (
        re.fullmatch(r"([ugoa]*[-+=]([rwxXst]*|[ugo]))+(,([ugoa]*[-+=]([rwxXst]*|[ugo]))+)*", spec)
        is not None
    )
