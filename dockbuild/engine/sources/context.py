"""Build contexts that are not a local directory: a tar (or a Dockerfile) on stdin, a
git repository URL, an HTTP(S) tarball. Each becomes a private temporary directory,
removed when the process exits, and is then read like any local context.

As ``docker build``: a tar (plain, gzip, bzip2 or xz, detected by content) is the
context; any other content on stdin or at the URL is the Dockerfile, with an empty
context. Archives are extracted safely: no entry lands outside the directory (absolute
paths, ``..``, links pointing out are refused).

Every build asks :func:`is_remote` first thing, so tarfile, tempfile and shutil load only
when a context is remote (they would delay the start of the context walk, build.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dockbuild.errors import DockbuildError

TYPE_CHECKING = False  # typing and tarfile load only for the type checker
if TYPE_CHECKING:
    import tarfile
    from typing import BinaryIO


def is_remote(spec: str) -> bool:
    return spec == "-" or spec.startswith(("http://", "https://", "git@", "git://", "ssh://"))


def _tempdir() -> Path:
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="dockbuild-context-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def load_context(
    spec: str, keep_git_dir: bool = False, stdin: BinaryIO | None = None, epoch: bool = False
) -> Path:
    """The directory holding the context ``spec`` names (``-``, a git URL, an HTTP URL).

    A git checkout's files get the checkout time, or the commit time with ``?mtime=commit``
    or when SOURCE_DATE_EPOCH is set (``epoch``), as BuildKit's git contexts."""
    from dockbuild.gitref import parse_git_ref

    try:
        git = parse_git_ref(spec)
    except ValueError as e:
        raise DockbuildError(f"unable to prepare context: {e}") from None
    if git is not None:
        from dockbuild.engine.sources import git as gitsrc

        dest = _tempdir() / "context"
        gitsrc.checkout(
            git.remote,
            git.ref,
            git.subdir,
            keep_git_dir if git.keep_git_dir is None else git.keep_git_dir,
            dest,
            git.checksum,
            git.mtime or ("commit" if epoch else "checkout"),
        )
        return dest
    import shutil

    root = _tempdir()
    blob = root / "download"
    if spec == "-":
        src = stdin or sys.stdin.buffer
        with open(blob, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
    elif spec.startswith(("http://", "https://")):
        _download(spec, blob)
    else:
        raise DockbuildError(f"unable to prepare context: {spec!r} is not a supported URL")
    dest = root / "context"
    dest.mkdir()
    if _is_tar(blob):
        extract_tar(blob, dest)
    else:
        os.replace(blob, dest / "Dockerfile")
    blob.unlink(missing_ok=True)
    return dest


def _download(url: str, dest: Path) -> None:
    import shutil
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers={"User-Agent": "dockbuild"}), timeout=60
        ) as r, open(dest, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except urllib.error.HTTPError as e:
        raise DockbuildError(f"unable to prepare context: {url}: invalid response status {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DockbuildError(f"unable to prepare context: {url}: {getattr(e, 'reason', e)}") from None


def _is_tar(path: Path) -> bool:
    import tarfile

    try:
        with tarfile.open(path, "r:*") as tf:
            return tf.next() is not None
    except (tarfile.TarError, OSError, EOFError):
        return False


def _member_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    # tarfile's "tar" filter refuses absolute paths, ".." and links leaving ``dest``;
    # keep the archive's modes (it would clear setuid bits) since COPY keeps modes.
    import tarfile

    mode = member.mode
    safe = tarfile.tar_filter(member, dest)
    if safe is None:
        return None
    return safe.replace(mode=mode, deep=False) if not (safe.issym() or safe.islnk()) else safe


def extract_tar(archive: Path, dest: Path) -> None:
    import tarfile

    try:
        with tarfile.open(archive, "r:*") as tf:
            tf.extractall(dest, filter=_member_filter)
    except tarfile.FilterError as e:
        raise DockbuildError(f"unable to prepare context: unsafe archive entry: {e}") from None
    except (tarfile.TarError, EOFError) as e:
        raise DockbuildError(f"unable to prepare context: broken archive: {e}") from None
