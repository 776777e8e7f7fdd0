"""What a build request names on this host: the Dockerfile, its .dockerignore, the contexts.

The build context and every ``--build-context`` become local directories (a tar on stdin,
a git URL or an HTTP tarball is fetched into a temporary one), OCI layouts or registry
references. This module loads little (no store, no frontend beyond .dockerignore): a
build resolves its contexts first thing, and starts hashing the main one in a child
process before the heavy modules load (:func:`local_dirs`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from dockbuild.errors import DockbuildError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from dockbuild.engine.sources.local import FileDigests, LocalDir

# What errors and snippets call a Dockerfile read from stdin (`-f -`).
STDIN_DOCKERFILE_NAME = "Dockerfile (stdin)"


# Named tuples rather than frozen dataclasses: a no-op rebuild loads this module, and a
# dataclass costs ~0.8 ms to create at import against ~0.1 ms for a named tuple.


class Layout(NamedTuple):
    """An ``oci-layout://PATH[:TAG|@DIGEST]`` build context."""

    path: Path
    tag: str | None
    digest: str | None


class Inputs(NamedTuple):
    """The Dockerfile and the contexts of one build, resolved on this host."""

    dockerfile_name: str  # as errors and the frontend name it
    dockerfile_text: bytes
    ignore_patterns: tuple[str, ...]  # the main context's .dockerignore
    local_dirs: dict[str, Path]  # context name -> directory ("context" is the main one)
    layouts: dict[str, Layout]
    images: dict[str, str]  # context name -> registry reference (docker-image://)


def context_name(name: str, inputs: Inputs) -> str:
    """The named context a FROM / --from name means: as BuildKit's dockerui NamedContext,
    the familiar form without ``:latest`` (``busybox:latest`` and
    ``docker.io/library/busybox`` are the context ``busybox``)."""
    known = (*inputs.local_dirs, *inputs.layouts, *inputs.images)
    if name in known:
        return name
    from dockbuild.engine.registry.reference import parse_reference

    try:
        short = parse_reference(name).familiar.removesuffix(":latest")
    except DockbuildError:
        return name
    return short if short in known else name


def resolve(
    context: str,
    dockerfile: str | None,
    build_contexts: Mapping[str, str],
    *,
    stdin_dockerfile: bytes | None = None,
    keep_git: bool = False,
    commit_times: Callable[[], bool] = bool,
) -> Inputs:
    """Fetch what is remote, read the Dockerfile and .dockerignore, sort the contexts.

    ``stdin_dockerfile`` is the Dockerfile read from stdin for ``-f -``; ``keep_git``
    keeps a git context's .git directory (BUILDKIT_CONTEXT_KEEP_GIT_DIR); ``commit_times()``
    says whether a git context's files get their commit times (SOURCE_DATE_EPOCH is set),
    asked only when a context is remote.
    """
    from dockbuild.engine.sources import context as remote_context
    from dockbuild.frontend.dockerignore import parse_dockerignore

    remote = remote_context.is_remote(context)
    # A tar on stdin (`-`), a git URL or an HTTP tarball becomes a temporary directory.
    ctx = remote_context.load_context(context, keep_git, epoch=commit_times()) if remote else Path(context)
    if not ctx.is_dir():
        raise DockbuildError(f"unable to prepare context: path {context!r} not found")
    if dockerfile == "-":
        df = Path("-")  # no Dockerfile.dockerignore for stdin: the context's applies
    elif dockerfile and remote and not Path(dockerfile).is_absolute():
        df = ctx / dockerfile  # -f names a file inside a remote context
    elif dockerfile:
        df = Path(dockerfile)
    else:
        df = ctx / "Dockerfile"
        if not df.exists() and (ctx / "dockerfile").exists():
            df = ctx / "dockerfile"
    if stdin_dockerfile is not None:
        text = stdin_dockerfile
    else:
        try:
            text = df.read_bytes()
        except OSError as e:
            reason = (e.strerror or str(e)).lower()
            raise DockbuildError(f"failed to read dockerfile: open {df}: {reason}") from e
    # <Dockerfile>.dockerignore beside the Dockerfile wins over the context's .dockerignore.
    ignore_file = Path(str(df) + ".dockerignore")
    if not ignore_file.exists():
        ignore_file = ctx / ".dockerignore"
    patterns = parse_dockerignore(ignore_file.read_bytes()) if ignore_file.exists() else ()
    locals_: dict[str, Path] = {"context": ctx}
    layouts: dict[str, Layout] = {}
    images: dict[str, str] = {}
    for name, value in build_contexts.items():
        if value.startswith("oci-layout://"):
            layouts[name] = split_layout(value[len("oci-layout://") :])
        elif value.startswith("docker-image://"):
            images[name] = value[len("docker-image://") :]
        elif remote_context.is_remote(value) and value != "-":
            locals_[name] = remote_context.load_context(value, keep_git, epoch=commit_times())  # git URL, HTTP tar
        elif "://" in value:
            raise DockbuildError(f"build context {name}={value}: this kind of context is not supported yet")
        else:
            if not Path(value).is_dir():
                raise DockbuildError(f"build context {name}={value}: not a directory")
            locals_[name] = Path(value)
    name = STDIN_DOCKERFILE_NAME if dockerfile == "-" else str(df)
    return Inputs(name, text, tuple(patterns), locals_, layouts, images)


def split_layout(text: str) -> Layout:
    """``PATH[:TAG]`` or ``PATH@sha256:...`` as buildx spells an oci-layout context."""
    if "@" in text:
        path, _, digest = text.rpartition("@")
        return Layout(Path(path), None, digest)
    head, sep, tail = text.rpartition(":")
    if sep and "/" not in tail and head:
        return Layout(Path(head), tail, None)
    return Layout(Path(text), None, None)


# A COPY or ADD of the whole context (``COPY . /app``, flags allowed, not --from): a
# Dockerfile that will hash the whole context, worth starting before it is converted.
_WHOLE_CONTEXT = re.compile(rb"(?im)^[ \t]*(?:copy|add)[ \t]+(?:--(?!from)\S+[ \t]+)*\./?[ \t]")


def copies_whole_context(dockerfile_text: bytes) -> bool:
    """Whether the Dockerfile seems to copy the whole build context (a cheap guess made
    before it is parsed: a wrong guess costs only a walk started early or late)."""
    return _WHOLE_CONTEXT.search(dockerfile_text) is not None


def local_dirs(inputs: Inputs, digests: FileDigests) -> dict[str, LocalDir]:
    """The local contexts, keyed by name; a Dockerfile that copies the whole build
    context (``COPY . /app``) starts hashing it now, in a child process, while this one
    loads the rest of dockbuild and converts the Dockerfile (forked while this process
    has no other thread)."""
    from dockbuild.engine.sources.local import LocalDir

    dirs = {
        name: LocalDir(path, inputs.ignore_patterns if name == "context" else _own_ignore(path), digests)
        for name, path in inputs.local_dirs.items()
    }
    if copies_whole_context(inputs.dockerfile_text):
        dirs["context"].prefetch()
    return dirs


def early_digests(db: Path) -> FileDigests | None:
    """The context digests of a cache database that exists and opens, before the store
    loads; None otherwise (the store then makes the database, or says why it cannot)."""
    import sqlite3

    from dockbuild.engine.sources.local import FileDigests

    if not db.exists():
        return None
    try:
        return FileDigests(db)
    except sqlite3.Error:
        return None


def _own_ignore(path: Path) -> tuple[str, ...]:
    """A named local context's own .dockerignore (BuildKit's namedcontext.go)."""
    from dockbuild.frontend.dockerignore import parse_dockerignore

    ignore_file = path / ".dockerignore"
    return tuple(parse_dockerignore(ignore_file.read_bytes())) if ignore_file.is_file() else ()
