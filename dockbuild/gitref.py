"""Git source URLs as BuildKit's dfgitutil reads them; shared by the frontend (ADD) and
the context loader (``dockbuild build https://host/repo.git#ref:dir``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit


@dataclass(frozen=True)
class GitRef:
    """A git source as BuildKit's dfgitutil.ParseGitRef reads it."""

    remote: str
    ref: str = ""
    subdir: str = ""
    keep_git_dir: bool | None = None
    checksum: str = ""
    submodules: bool = True
    mtime: str = ""  # "commit" or "checkout" (?mtime=); "" lets the build decide


def parse_git_ref(src: str) -> GitRef | None:
    """``https://host/x.git#ref:subdir``, ``git@host:x.git``, ``ssh://``, ``git://`` and
    the query form (``?ref=&subdir=&checksum=&keep-git-dir=&tag=&branch=&commit=&mtime=``);
    None when ``src`` is not a git source."""
    scheme = src.split("://", 1)[0] if "://" in src else ""
    if src.startswith("git@"):
        scheme = "scp"
    remote, _, fragment = src.partition("#")
    remote, _, query = remote.partition("?")
    if scheme in ("http", "https"):
        if not urlsplit(remote).path.endswith(".git"):
            return None
    elif scheme not in ("git", "ssh", "scp"):
        return None
    ref = subdir = checksum = ""
    keep: bool | None = None
    submodules = True
    mtime = ""
    if fragment:
        ref, _, subdir = fragment.partition(":")
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in ("ref", "tag", "branch", "commit"):
            ref = value
        elif key == "subdir":
            subdir = value
        elif key == "checksum":
            checksum = value
        elif key == "keep-git-dir":
            keep = value.lower() in ("1", "true", "yes", "")
        elif key == "submodules":
            submodules = value.lower() not in ("0", "false", "no")
        elif key == "mtime":
            if value not in ("commit", "checkout"):
                raise ValueError(f"invalid mtime {value!r} in git source {src!r}: expected commit or checkout")
            mtime = value
        else:
            raise ValueError(f"unexpected query {key!r} in git source {src!r}")
    return GitRef(remote, ref, subdir.strip("/"), keep, checksum, submodules, mtime)
