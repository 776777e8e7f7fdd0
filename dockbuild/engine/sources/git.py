"""Git sources (``ADD https://host/repo.git#ref:subdir``, git build contexts), with the
system ``git``.

The ref resolves to a commit with ``git ls-remote`` (cheap: no clone to compute a cache
key); the commit is then fetched shallowly into a fresh repository. As in BuildKit,
``.git`` is removed unless ``--keep-git-dir``, files get mode 0644 (0755 when
executable) and directories 0755, owned by root; ``--checksum`` is a commit prefix that
the resolved commit must start with. File mtimes are the checkout time, or the commit
time with ``mtime=commit`` (BuildKit's git.mtime: ``?mtime=commit``, or SOURCE_DATE_EPOCH
set), which makes a checkout reproducible.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from dockbuild import llb
from dockbuild.errors import DockbuildError

_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def _git(*args: str, cwd: Path | None = None) -> str:
    if shutil.which("git") is None:
        raise DockbuildError("git sources need the git command", hint="install git (apt-get install git)")
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="true", LC_ALL="C")
    proc = subprocess.run(
        ["git", "-c", "protocol.file.allow=always", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise DockbuildError(f"git {args[0]} failed: {tail}")
    return proc.stdout


def _check_words(remote: str, ref: str) -> None:
    # Neither may pass for a git option (``--upload-pack=...`` would run a command).
    if remote.startswith("-") or ref.startswith("-") or any(c in ref for c in " \t\n\0"):
        raise DockbuildError(f"git source {remote!r}: invalid ref {ref!r}")


def resolve(remote: str, ref: str) -> str:
    """The commit ``ref`` (branch, tag, full commit; "" = HEAD) names in ``remote``."""
    _check_words(remote, ref)
    if _SHA.fullmatch(ref):
        return ref
    out = _git("ls-remote", "--", remote, ref or "HEAD")
    refs: dict[str, str] = {}
    for line in out.splitlines():
        sha, _, name = line.partition("\t")
        refs[name] = sha
    if not ref:
        if "HEAD" in refs:
            return refs["HEAD"]
    else:
        # A peeled tag names the commit; exact names beat suffix matches.
        for name in (f"refs/tags/{ref}^{{}}", f"refs/heads/{ref}", f"refs/tags/{ref}", ref):
            if name in refs:
                return refs[name]
        for name, sha in refs.items():
            if name.endswith("/" + ref):
                return sha
    raise DockbuildError(f"git source {remote}: ref {ref or 'HEAD'!r} not found")


def content_key(op: llb.SourceOp) -> str:
    remote = op.identifier[len("git://") :]
    commit = resolve(remote, op.attr("ref"))
    _check(remote, commit, op.attr("checksum"))
    return commit


def _check(remote: str, commit: str, checksum: str) -> None:
    if checksum and not commit.startswith(checksum.lower()):
        raise DockbuildError(
            f"git source {remote}: expected checksum to match {checksum}, got {commit}"
        )


def checkout(
    remote: str, ref: str, subdir: str, keep_git_dir: bool, dest: Path, checksum: str = "", mtime: str = "checkout"
) -> str:
    """Fetch ``ref`` of ``remote`` and put its tree (or ``subdir`` of it) at ``dest``
    (which must not exist), with file times of the checkout or (``mtime="commit"``) of
    the commit. Return the commit."""
    commit = resolve(remote, ref)
    _check(remote, commit, checksum)
    work = dest.with_name(dest.name + ".git-work")
    work.mkdir()
    try:
        _git("init", "-q", str(work))
        fetch_ref = ref if ref and not _SHA.fullmatch(ref) else commit
        try:
            _git("fetch", "-q", "--depth=1", "--no-tags", "--", remote, fetch_ref, cwd=work)
        except DockbuildError:
            _git("fetch", "-q", "--no-tags", "--", remote, cwd=work)  # servers refusing shallow or by-commit
        _git("-c", "advice.detachedHead=false", "checkout", "-q", commit, cwd=work)
        if (work / ".gitmodules").exists():
            _git("submodule", "update", "--init", "--recursive", "--depth=1", cwd=work)
        when = int(_git("log", "-1", "--format=%ct", commit, cwd=work).strip() or 0)
        if keep_git_dir:
            _git("update-ref", "HEAD", commit, cwd=work)
        else:
            shutil.rmtree(work / ".git")
        tree = work
        if subdir:
            tree = (work / subdir).resolve()
            if not str(tree).startswith(str(work.resolve()) + os.sep) and tree != work.resolve():
                raise DockbuildError(f"git source {remote}: subdir {subdir!r} leaves the repository")
            if not tree.is_dir():
                raise DockbuildError(f"git source {remote}: subdir {subdir!r} not found at {commit[:12]}")
        _normalise(tree, when if mtime == "commit" else None, skip_git=keep_git_dir)
        os.rename(tree, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return commit


def _normalise(root: Path, mtime: int | None, skip_git: bool) -> None:
    """Modes 0644/0755 (by the executable bit), dirs 0755, owner root, and ``mtime`` (the
    commit time) unless None (the checkout's times stay)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        if skip_git and (dirpath == str(root / ".git") or dirpath.startswith(str(root / ".git") + os.sep)):
            continue
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if st.st_mode & 0o100 else 0o644)
            os.lchown(p, 0, 0)
            if mtime is not None:
                os.utime(p, (mtime, mtime), follow_symlinks=False)
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
            os.lchown(p, 0, 0)
            if mtime is not None:
                os.utime(p, (mtime, mtime), follow_symlinks=False)
    os.chmod(root, 0o755)
    if mtime is not None:
        os.utime(root, (mtime, mtime))


def materialize(op: llb.SourceOp, layer_dir: Path) -> None:
    """Check the source out into ``layer_dir`` (an empty directory, replaced)."""
    remote = op.identifier[len("git://") :]
    tree = layer_dir.with_name(layer_dir.name + ".tree")
    checkout(
        remote,
        op.attr("ref"),
        op.attr("subdir"),
        op.attr("keep_git_dir") == "true",
        tree,
        op.attr("checksum"),
        op.attr("mtime", "checkout"),
    )
    layer_dir.rmdir()
    os.rename(tree, layer_dir)
