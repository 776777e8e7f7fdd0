"""File ops (COPY, ADD of local files, WORKDIR's mkdir, inline files) run in-process.

Each op writes into an empty ``upper`` directory that becomes the step's layer, on top of
the base chain, in overlay format: a parent directory that already exists below is
created in ``upper`` with the same owner, mode and mtime (as an overlay copy-up would),
a removed path becomes a 0:0 character device. Sources are read through a
:class:`SourceView`: a local context in place, or the merged view of a layer chain.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from dockbuild import llb
from dockbuild.engine import snapshots
from dockbuild.engine.sources.local import LocalDir, has_glob, match
from dockbuild.errors import DockbuildError


class SourceView:
    """Read access to a filesystem tree by relative path ("" is the root)."""

    reset_owner = False  # a local context's files are owned by root in the image

    def host(self, rel: str) -> Path | None:
        """The host path holding the entry visible at ``rel``, or None."""
        raise NotImplementedError

    def children(self, rel: str) -> list[str]:
        raise NotImplementedError

    def lstat(self, rel: str) -> os.stat_result | None:
        p = self.host(rel)
        return os.lstat(p) if p is not None else None

    def resolve(self, rel: str) -> str:
        """Follow symlinks in ``rel`` (all components) without leaving the tree."""
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        out: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if out:
                    out.pop()
                continue
            cand = "/".join([*out, part])
            st = self.lstat(cand)
            if st is not None and stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > 40:
                    raise DockbuildError(f"too many levels of symbolic links in {rel!r}")
                target = os.readlink(self.host(cand))  # type: ignore[arg-type]
                if target.startswith("/"):
                    out = []
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                continue
            out.append(part)
        return "/".join(out)

    def glob(self, pattern: str) -> list[str]:
        parts = [p for p in pattern.strip("/").split("/") if p not in ("", ".")]
        found = [""]
        for part in parts:
            nxt = []
            for base in found:
                if has_glob(part):
                    names = self.children(base)
                    nxt += [f"{base}/{n}" if base else n for n in sorted(names) if match(part, n)]
                else:
                    cand = f"{base}/{part}" if base else part
                    if self.lstat(cand) is not None:
                        nxt.append(cand)
            found = nxt
        return found


class LocalView(SourceView):
    reset_owner = True

    def __init__(self, local: LocalDir) -> None:
        self.local = local

    def host(self, rel: str) -> Path | None:
        if rel and self.local.ignored(rel):
            return None
        p = self.local.host_path(rel)
        return p if os.path.lexists(p) else None

    def children(self, rel: str) -> list[str]:
        try:
            names = os.listdir(self.local.host_path(rel))
        except (NotADirectoryError, FileNotFoundError):
            return []
        return sorted(n for n in names if not self.local.ignored(f"{rel}/{n}" if rel else n))

    def glob(self, pattern: str) -> list[str]:
        return self.local.glob(pattern)


class LayersView(SourceView):
    """The merged view of a layer chain (bottom first)."""

    def __init__(self, layers: Sequence[Path]) -> None:
        self.layers = tuple(layers)

    def host(self, rel: str) -> Path | None:
        return snapshots.lookup(self.layers, rel)

    def children(self, rel: str) -> list[str]:
        return snapshots.list_dir(self.layers, rel)


def apply(
    actions: tuple[llb.FileAction, ...],
    base: Sequence[Path],
    upper: Path,
    sources: list[SourceView],
) -> None:
    """Run ``actions`` in order; ``sources`` holds one view per Copy action."""
    target = _Target(base, upper)
    views = iter(sources)
    for action in actions:
        if isinstance(action, llb.Copy):
            _copy(action, next(views), target)
        elif isinstance(action, llb.Mkdir):
            _mkdir(action, target)
        elif isinstance(action, llb.Mkfile):
            _mkfile(action, target)
        elif isinstance(action, llb.Rm):
            _rm(action, target)
    target.finish()


class _Target:
    """The destination: ``upper`` over ``base``, written only through ``upper``."""

    def __init__(self, base: Sequence[Path], upper: Path) -> None:
        self.base = tuple(base)
        self.upper = upper
        self.view = LayersView((*self.base, upper))
        self._dir_mtimes: dict[str, int] = {}

    def resolve_parent(self, dest: str) -> str:
        """``dest`` with symlinks in its parent directories followed (not the last part)."""
        parent, name = posixpath.split(dest.strip("/"))
        parent = self.view.resolve(parent) if parent else ""
        return f"{parent}/{name}" if parent else name

    def ensure_dir(self, rel: str, owner: tuple[int, int] | None = None) -> None:
        """Make ``rel`` a directory in ``upper``, copying up metadata from below."""
        if not rel:
            return
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            up = self.upper / sub
            st_up = _lstat(up)
            if st_up is not None and stat.S_ISDIR(st_up.st_mode):
                continue
            if st_up is not None:
                up.unlink()
            below = LayersView(self.base).host(sub)
            st = os.lstat(below) if below is not None else None
            if st is not None and stat.S_ISDIR(st.st_mode):
                os.mkdir(up)
                os.chmod(up, stat.S_IMODE(st.st_mode))
                os.lchown(up, st.st_uid, st.st_gid)
                self._dir_mtimes.setdefault(sub, st.st_mtime_ns)
            else:
                os.mkdir(up)
                os.chmod(up, 0o755)
                if owner is not None:
                    os.lchown(up, *owner)

    def clear(self, rel: str) -> None:
        """Remove whatever ``upper`` holds at ``rel`` (not what lies below it)."""
        p = self.upper / rel
        st = _lstat(p)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(p)
        else:
            p.unlink()

    def keep_mtime(self, rel: str, mtime_ns: int) -> None:
        self._dir_mtimes[rel] = mtime_ns

    def finish(self) -> None:
        # Directory mtimes last, deepest first: writing children changes them.
        for rel in sorted(self._dir_mtimes, key=lambda r: r.count("/"), reverse=True):
            p = self.upper / rel
            if _lstat(p) is not None:
                ns = self._dir_mtimes[rel]
                os.utime(p, ns=(ns, ns), follow_symlinks=False)

    def exists_as_dir(self, rel: str) -> bool:
        host = self.view.host(self.view.resolve(rel)) if rel else self.upper
        return host is not None and os.path.isdir(host)


def _lstat(p: Path) -> os.stat_result | None:
    try:
        return os.lstat(p)
    except FileNotFoundError:
        return None


# -- owners and modes ------------------------------------------------------------------


def _resolve_chown(chown: llb.Chown | None, target: _Target) -> tuple[int, int] | None:
    if chown is None:
        return None

    def table(path: str) -> list[list[str]]:
        host = target.view.host(target.view.resolve(path))
        if host is None or not host.is_file():
            return []
        return [line.split(":") for line in host.read_text(errors="replace").splitlines()]

    uid: int | None = None
    gid: int | None = None
    if chown.user.isdigit():
        uid = int(chown.user)
    else:
        for fields in table("etc/passwd"):
            if len(fields) > 3 and fields[0] == chown.user:
                uid, gid = int(fields[2]), int(fields[3])
                break
        else:
            raise DockbuildError(
                f"unable to convert uid/gid chown string to host mapping: "
                f"can't find uid for user {chown.user}: no such user: {chown.user}"
            )
    if chown.group:
        if chown.group.isdigit():
            gid = int(chown.group)
        else:
            for fields in table("etc/group"):
                if len(fields) > 2 and fields[0] == chown.group:
                    gid = int(fields[2])
                    break
            else:
                raise DockbuildError(
                    f"unable to convert uid/gid chown string to host mapping: "
                    f"can't find gid for group {chown.group}: no such group: {chown.group}"
                )
    elif gid is None:
        gid = uid
    return uid, gid  # type: ignore[return-value]


def _apply_mode(spec: str, current: int, is_dir: bool) -> int:
    """``--chmod``: octal, or symbolic like chmod(1) (``u+x``, ``go=rX``, ``g=u``)."""
    if not spec:
        return current
    if all(c in "01234567" for c in spec):
        return int(spec, 8)
    mode = current
    for clause in spec.split(","):
        i = 0
        who = ""
        while i < len(clause) and clause[i] in "ugoa":
            who += clause[i]
            i += 1
        who = who or "a"
        if "a" in who:
            who = "ugo"
        while i < len(clause):
            op = clause[i]
            if op not in "+-=":
                raise DockbuildError(f"invalid chmod {spec!r}")
            i += 1
            perms = ""
            while i < len(clause) and clause[i] not in "+-=":
                perms += clause[i]
                i += 1
            bits = 0
            for w in who:
                shift = {"u": 6, "g": 3, "o": 0}[w]
                for p in perms:
                    if p in "ugo":
                        src = {"u": 6, "g": 3, "o": 0}[p]
                        bits |= ((current >> src) & 7) << shift
                    elif p == "r":
                        bits |= 4 << shift
                    elif p == "w":
                        bits |= 2 << shift
                    elif p == "x" or (p == "X" and (is_dir or current & 0o111)):
                        bits |= 1 << shift
                    elif p == "s" and w in "ug":
                        bits |= 0o4000 if w == "u" else 0o2000
                    elif p == "t":
                        bits |= 0o1000
                    elif p not in "X":
                        raise DockbuildError(f"invalid chmod {spec!r}")
            if op == "+":
                mode |= bits
            elif op == "-":
                mode &= ~bits
            else:
                mask = 0
                for w in who:
                    mask |= 7 << {"u": 6, "g": 3, "o": 0}[w]
                mode = (mode & ~mask) | bits
    return mode


# -- actions ---------------------------------------------------------------------------


def _copy(action: llb.Copy, view: SourceView, target: _Target) -> None:
    src = action.src.strip("/")
    wildcard = action.allow_wildcard and has_glob(src)
    if wildcard:
        matches = view.glob(src)
        if not matches and not action.allow_empty_wildcard:
            raise DockbuildError(f"failed to compute cache key: no source files were specified: {action.src!r} matched nothing")
    else:
        rel = view.resolve(src) if action.follow_symlinks else src
        if src not in ("", ".") and view.lstat(rel) is None:
            raise DockbuildError(f'failed to compute cache key: "/{src}": not found')
        matches = [rel if src not in ("", ".") else ""]
    owner = _resolve_chown(action.chown, target)
    dest = action.dest
    dest_is_dir = dest.endswith("/") or wildcard
    dest_rel = target.resolve_parent(dest) if dest.strip("/") else ""
    copier = _Copier(view, target, owner, action.mode, action.timestamp, action.exclude)
    for rel in matches:
        if wildcard and action.follow_symlinks:
            rel = view.resolve(rel)
        st = view.lstat(rel)
        assert st is not None
        if stat.S_ISDIR(st.st_mode) and action.dir_copy_contents:
            out = dest_rel
            if out:
                target.ensure_dir(posixpath.dirname(out), owner)
                copier.entry(rel, out, top=True)
            else:
                copier.children(rel, "")
            continue
        if dest_is_dir or target.exists_as_dir(dest_rel):
            out = posixpath.join(target.view.resolve(dest_rel), posixpath.basename(rel) or "")
        else:
            out = dest_rel
        target.ensure_dir(posixpath.dirname(out), owner)
        copier.entry(rel, out, top=True)


class _Copier:
    def __init__(
        self,
        view: SourceView,
        target: _Target,
        owner: tuple[int, int] | None,
        mode: str,
        timestamp: int | None,
        exclude: tuple[str, ...],
    ) -> None:
        self.view = view
        self.target = target
        self.owner = owner
        self.mode = mode
        self.timestamp = timestamp
        self.exclude = exclude
        self.links: dict[tuple[int, int], str] = {}

    def excluded(self, rel: str) -> bool:
        from dockbuild.engine.sources.local import _ignored, ignore_rules

        return bool(self.exclude) and _ignored(ignore_rules(self.exclude), rel)

    def children(self, src: str, out: str) -> None:
        for name in self.view.children(src):
            s = f"{src}/{name}" if src else name
            if self.excluded(s):
                continue
            self.entry(s, f"{out}/{name}" if out else name)

    def entry(self, src: str, out: str, top: bool = False) -> None:
        host = self.view.host(src)
        assert host is not None
        st = os.lstat(host)
        dest = self.target.upper / out
        uid, gid = self.owner or ((0, 0) if self.view.reset_owner else (st.st_uid, st.st_gid))
        mode = _apply_mode(self.mode, stat.S_IMODE(st.st_mode), stat.S_ISDIR(st.st_mode))
        mtime = self.timestamp * 10**9 if self.timestamp is not None else st.st_mtime_ns
        if stat.S_ISDIR(st.st_mode):
            existing = _lstat(dest)
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                dest.unlink()
                existing = None
            if existing is None:
                if self.target.exists_as_dir(out):
                    self.target.ensure_dir(out)  # merge into the directory below
                else:
                    os.mkdir(dest)
            os.chmod(dest, mode)
            os.lchown(dest, uid, gid)
            self.children(src, out)
            self.target.keep_mtime(out, mtime)
            return
        self.target.clear(out)
        link_key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and link_key in self.links:
            os.link(self.target.upper / self.links[link_key], dest)
            return
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(host), dest)
        elif stat.S_ISREG(st.st_mode):
            shutil.copyfile(host, dest, follow_symlinks=False)
            os.chmod(dest, mode)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(dest, mode)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return  # a whiteout in a source layer is not a file to copy
            os.mknod(dest, st.st_mode, st.st_rdev)
        else:
            return  # sockets are not copied
        os.lchown(dest, uid, gid)
        os.utime(dest, ns=(mtime, mtime), follow_symlinks=False)
        if st.st_nlink > 1:
            self.links[link_key] = out


def _mkdir(action: llb.Mkdir, target: _Target) -> None:
    owner = _resolve_chown(action.chown, target)
    rel = target.resolve_parent(action.path)
    if not rel:
        return
    if target.exists_as_dir(rel):
        return
    parent = posixpath.dirname(rel)
    if parent and not action.make_parents and not target.exists_as_dir(parent):
        raise DockbuildError(f"mkdir {action.path}: no such file or directory")
    target.ensure_dir(parent, owner)
    target.clear(rel)
    p = target.upper / rel
    os.mkdir(p)
    os.chmod(p, action.mode)
    if owner is not None:
        os.lchown(p, *owner)
    if action.timestamp is not None:
        target.keep_mtime(rel, action.timestamp * 10**9)


def _mkfile(action: llb.Mkfile, target: _Target) -> None:
    owner = _resolve_chown(action.chown, target)
    rel = target.resolve_parent(action.path)
    target.ensure_dir(posixpath.dirname(rel), owner)
    target.clear(rel)
    p = target.upper / rel
    with open(p, "wb") as f:
        f.write(action.data)
    os.chmod(p, action.mode)
    if owner is not None:
        os.lchown(p, *owner)
    if action.timestamp is not None:
        os.utime(p, ns=(action.timestamp * 10**9,) * 2)


def _rm(action: llb.Rm, target: _Target) -> None:
    rels = target.view.glob(action.path) if action.allow_wildcard else [action.path.strip("/")]
    for rel in rels:
        rel = target.resolve_parent(rel)
        if target.view.host(rel) is None:
            if action.allow_not_found:
                continue
            raise DockbuildError(f"rm {action.path}: no such file or directory")
        target.clear(rel)
        if LayersView(target.base).host(rel) is not None:
            target.ensure_dir(posixpath.dirname(rel))
            os.mknod(target.upper / rel, stat.S_IFCHR | 0o000, 0)  # overlay whiteout
