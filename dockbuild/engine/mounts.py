"""RUN mounts on the host side: cache dirs, bind sources, secrets, ssh agent sockets.

The solver turns each ``llb.Mount`` of an ExecOp into an executor ``ExecMount`` here:

- ``cache``: a directory under ``<root>/mounts/`` that outlives the build, shared by
  every build using the same id (and ``from`` base). ``sharing=shared`` lets concurrent
  steps use it together, ``locked`` waits until no one else uses it, ``private`` takes a
  free instance or makes a new one. Its contents never enter a layer or a cache key.
- ``bind``: a layer chain (overlay) or a local context dir; ``rw`` writes go to a
  throw-away upper dir.
- ``tmpfs``; ``secret`` (bytes handed to the executor, kept in memory); ``ssh`` (a
  socket forwarding to the user's agent, with the mount's mode and owner).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from dockbuild import llb
from dockbuild.errors import DockbuildError

if TYPE_CHECKING:
    from dockbuild.engine.executor import ExecMount
    from dockbuild.engine.sources.local import LocalDir
    from dockbuild.secrets import SecretSource, SSHSource

ENTITLEMENTS = ("network.host", "security.insecure")


def check_entitlements(root: llb.Op | None, allow: frozenset[str] | set[str]) -> None:
    """Refuse, before anything runs, RUN steps that need an entitlement not granted."""
    for op in llb.walk(root):
        if isinstance(op, llb.ExecOp):
            check_op(op, allow)


def check_op(op: llb.ExecOp, allow: frozenset[str] | set[str]) -> None:
    if op.network == "host" and "network.host" not in allow:
        raise DockbuildError(
            # BuildKit's words first ("entitlement network.host is not allowed")
            f"{op.name or 'RUN'}: entitlement network.host is not allowed (--network=host needs it)",
            hint="pass --allow network.host",
        )
    if op.security == "insecure" and "security.insecure" not in allow:
        raise DockbuildError(
            f"{op.name or 'RUN'}: entitlement security.insecure is not allowed "
            "(--security=insecure needs it)",
            hint="pass --allow security.insecure",
        )


# -- cache mounts ------------------------------------------------------------------------


class CacheMounts:
    """Persistent cache dirs: ``<root>/mounts/<hash of id and base>/<instance>``."""

    def __init__(self, root: Path) -> None:
        self.base = root / "mounts"

    @contextlib.contextmanager
    def use(
        self,
        cache_id: str,
        scope: str,
        sharing: str,
        seed: Callable[[Path], None] | None,
        mode: int | None,
        uid: int | None,
        gid: int | None,
        cancelled: Callable[[], bool],
    ) -> Iterator[Path]:
        name = hashlib.sha256(f"{cache_id}\0{scope}".encode()).hexdigest()[:32]
        home = self.base / name
        home.mkdir(parents=True, exist_ok=True)
        label = home / "id"
        if not label.exists():  # for humans looking at the cache root
            _write_atomic(label, f"{cache_id}\n".encode())
        lock_file, instance = self._acquire(home, sharing, cancelled)
        try:
            path = home / str(instance)
            if not path.exists():
                self._create(home, path, seed, mode, uid, gid)
            yield path
        finally:
            lock_file.close()  # releases the flock

    def _acquire(
        self, home: Path, sharing: str, cancelled: Callable[[], bool]
    ) -> tuple[TextIO, int]:
        if sharing == "private":
            instance = 0
            while True:
                f = open(home / f"{instance}.lock", "a+")  # noqa: SIM115
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return f, instance
                except BlockingIOError:
                    f.close()
                    instance += 1
        f = open(home / "0.lock", "a+")  # noqa: SIM115
        how = fcntl.LOCK_SH if sharing == "shared" else fcntl.LOCK_EX
        # Poll rather than block, so a cancelled build does not wait for another one.
        while True:
            try:
                fcntl.flock(f, how | fcntl.LOCK_NB)
                return f, 0
            except BlockingIOError:
                if cancelled():
                    f.close()
                    raise DockbuildError(
                        "cancelled while waiting for a locked cache mount"
                    ) from None
                time.sleep(0.05)

    def _create(
        self,
        home: Path,
        path: Path,
        seed: Callable[[Path], None] | None,
        mode: int | None,
        uid: int | None,
        gid: int | None,
    ) -> None:
        with open(home / "create.lock", "a+") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if path.exists():
                return
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=home))
            try:
                if seed is not None:
                    seed(tmp)
                os.chmod(tmp, 0o755 if mode is None else mode)
                os.chown(tmp, uid or 0, gid or 0)
                os.rename(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def copy_merged(layers: tuple[Path, ...], subpath: str, dest: Path) -> None:
    """Copy what ``subpath`` holds in the merged view of ``layers`` into ``dest``."""
    from dockbuild.engine.snapshots import walk_merged

    prefix = subpath.strip("/")
    found = not prefix
    for rel, src in walk_merged(layers):
        if prefix:
            if rel == prefix:
                found = True
                continue
            if not rel.startswith(prefix + "/"):
                continue
            rel = rel[len(prefix) + 1 :]
        _copy_entry(src, dest / rel)
    if not found:
        raise DockbuildError(f"cache mount source {subpath}: no such file or directory")


def _copy_entry(src: Path, dst: Path) -> None:
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        dst.mkdir(exist_ok=True)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        shutil.copy2(src, dst, follow_symlinks=False)
    else:
        return
    os.lchown(dst, st.st_uid, st.st_gid)


def copy_local(local: LocalDir, subpath: str, dest: Path) -> None:
    """Copy a context dir (``.dockerignore`` applied) for a bind mount of it."""
    rel = subpath.strip("/")
    if rel in ("", "."):
        rel = ""
    for child in local.walk(rel):
        src = local.host_path(child)
        out = dest / (child[len(rel) + 1 :] if rel else child)
        out.parent.mkdir(parents=True, exist_ok=True)
        st = os.lstat(src)
        if stat.S_ISDIR(st.st_mode):
            out.mkdir(exist_ok=True)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), out)
        elif stat.S_ISREG(st.st_mode):
            shutil.copy2(src, out, follow_symlinks=False)


# -- ssh agent forwarding ------------------------------------------------------------------


@dataclass(eq=False)
class SSHForwarding:
    """Agent sockets for ``RUN --mount=type=ssh``, one proxy per id and mode/owner.

    The proxy is a socket of our own (so the mount gets its mode/uid/gid without
    touching the user's agent socket) that relays each connection to the agent: the
    user's ``$SSH_AUTH_SOCK``, a socket given with ``--ssh``, or an ``ssh-agent`` we start
    and load with the key files given with ``--ssh``.
    """

    sources: dict[str, SSHSource]
    _dir: str = ""
    _upstreams: dict[str, str] = field(default_factory=dict)
    _proxies: dict[tuple[str, int, int, int], str] = field(default_factory=dict)
    _listeners: list[socket.socket] = field(default_factory=list)
    _agents: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def socket_for(self, sid: str, mode: int, uid: int, gid: int, required: bool) -> str | None:
        with self._lock:
            source = self.sources.get(sid)
            if source is None:
                if required:
                    raise DockbuildError(
                        f"no SSH key or agent {sid!r} forwarded for RUN --mount=type=ssh",
                        hint=f"pass --ssh {sid}"
                        + ("" if sid != "default" else " (uses $SSH_AUTH_SOCK)"),
                    )
                return None
            key = (sid, mode, uid, gid)
            if key not in self._proxies:
                self._proxies[key] = self._proxy(self._upstream(source), mode, uid, gid)
            return self._proxies[key]

    def close(self) -> None:
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.close()
        for agent in self._agents:
            agent.kill()
            agent.wait()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _tmp(self) -> str:
        if not self._dir:
            # Short: a socket path must fit in 108 bytes.
            self._dir = tempfile.mkdtemp(prefix="dockbuild-ssh-")
        return self._dir

    def _upstream(self, source: SSHSource) -> str:
        if source.id in self._upstreams:
            return self._upstreams[source.id]
        paths = source.paths or (os.environ.get("SSH_AUTH_SOCK", ""),)
        sockets = [p for p in paths if p and stat.S_ISSOCK(os.stat(p).st_mode)]
        keys = [p for p in paths if p and p not in sockets]
        if sockets and keys:
            raise DockbuildError(f"--ssh {source.id}: give agent sockets or key files, not both")
        if sockets:
            upstream = sockets[0]
        elif keys:
            upstream = self._start_agent(source.id, keys)
        else:
            raise DockbuildError(f"--ssh {source.id}: SSH_AUTH_SOCK is not set")
        self._upstreams[source.id] = upstream
        return upstream

    def _start_agent(self, sid: str, keys: list[str]) -> str:
        path = os.path.join(self._tmp(), f"agent{len(self._agents)}.sock")
        try:
            agent = subprocess.Popen(
                ["ssh-agent", "-D", "-a", path],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as e:
            raise DockbuildError(
                f"--ssh {sid}: cannot start ssh-agent for the key files: {e.strerror}",
                hint="install openssh-client, or forward a running agent with --ssh default",
            ) from None
        self._agents.append(agent)
        deadline = time.monotonic() + 5
        while not os.path.exists(path):
            if time.monotonic() > deadline or agent.poll() is not None:
                raise DockbuildError(f"--ssh {sid}: ssh-agent did not start")
            time.sleep(0.01)
        env = dict(os.environ, SSH_AUTH_SOCK=path, SSH_ASKPASS_REQUIRE="never")
        done = subprocess.run(
            ["ssh-add", *keys], env=env, stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip().splitlines()
            raise DockbuildError(
                f"--ssh {sid}: cannot load the key files: {message[-1] if message else 'ssh-add failed'}",
                hint="keys with a passphrase must be loaded into an agent (ssh-add) and forwarded",
            )
        return path

    def _proxy(self, upstream: str, mode: int, uid: int, gid: int) -> str:
        path = os.path.join(self._tmp(), f"proxy{len(self._listeners)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        listener.listen(16)
        self._listeners.append(listener)
        from dockbuild.engine import sshrelay

        sshrelay.serve(listener, upstream, "ssh-proxy")
        return path


# -- putting one RUN's mounts together ---------------------------------------------------


@dataclass
class RunMounts:
    """What the solver hands over to build the executor mounts of one ExecOp."""

    cache: CacheMounts
    secrets: dict[str, SecretSource]
    ssh: SSHForwarding
    locals: dict[str, LocalDir]
    layer_paths: Callable[[tuple[str, ...]], tuple[Path, ...]]
    input_key: Callable[[llb.Op | None], str]
    cancelled: Callable[[], bool]

    def prepare(
        self,
        op: llb.ExecOp,
        states: dict[int, tuple[str, ...]],
        work: Path,
        stack: contextlib.ExitStack,
    ) -> tuple[list[ExecMount], list[str]]:
        """Executor mounts for ``op.mounts[1:]`` and extra environment (secret env=)."""
        from dockbuild.engine.executor import ExecMount

        specs: list[ExecMount] = []
        env: list[str] = []
        for index, m in enumerate(op.mounts):
            if index == 0:
                continue
            scratch = work / f"m{index}"
            if m.type == "bind":
                specs.append(self._bind(m, states.get(index, ()), scratch))
            elif m.type == "cache":
                specs.append(self._cache(m, states.get(index, ()), stack))
            elif m.type == "tmpfs":
                options = (f"size={m.size}",) if m.size else ()
                specs.append(ExecMount(m.target, "tmpfs", options=options, readonly=m.readonly))
            elif m.type == "secret":
                source = self.secrets.get(m.secret_id)
                if source is None:
                    if m.required:
                        raise DockbuildError(
                            f"secret {m.secret_id} not found",
                            hint=f"pass --secret id={m.secret_id},src=FILE (or env=VARIABLE)",
                        )
                    continue
                data = source.read()
                if m.env:
                    env.append(f"{m.env}={data.decode(errors='replace')}")
                if m.target:
                    specs.append(
                        ExecMount(
                            m.target,
                            "secret",
                            readonly=True,
                            data=data,
                            mode=m.mode,
                            uid=m.uid,
                            gid=m.gid,
                        )  # fmt: skip
                    )
            elif m.type == "ssh":
                path = self.ssh.socket_for(
                    m.secret_id or "default",
                    0o600 if m.mode is None else m.mode,
                    m.uid or 0,
                    m.gid or 0,
                    m.required,
                )
                if path is not None:
                    specs.append(ExecMount(m.target, "bind", source=path))
            else:
                raise DockbuildError(f"unsupported mount type {m.type!r}")
        return specs, env

    def _bind(self, m: llb.Mount, state: tuple[str, ...], scratch: Path) -> ExecMount:
        from dockbuild.engine.executor import ExecMount

        source = m.input
        subpath = m.selector.strip("/")
        lowers: tuple[str, ...]
        if isinstance(source, llb.SourceOp) and source.identifier.startswith("local://"):
            local = self.locals[source.identifier[len("local://") :]]
            if local.excludes:
                # The context as the build sees it: ignored files are not there.
                copied = scratch / "context"
                copied.mkdir(parents=True)
                if subpath and local.ignored(subpath):
                    raise DockbuildError(
                        f"failed to mount {m.target}: {subpath}: excluded by .dockerignore"
                    )
                if subpath and not local.host_path(subpath).exists():
                    raise DockbuildError(
                        f"failed to mount {m.target}: {subpath}: no such file or directory in the context"
                    )
                if subpath and not local.host_path(subpath).is_dir():
                    shutil.copy2(local.host_path(subpath), copied / "file")
                    lowers, subpath = (str(copied),), "file"
                else:
                    copy_local(local, subpath, copied)
                    lowers, subpath = (str(copied),), ""
            else:
                lowers = (str(local.path),)
        else:
            lowers = tuple(str(p) for p in reversed(self.layer_paths(state)))
            if not lowers:
                empty = scratch / "empty"
                empty.mkdir(parents=True)
                lowers = (str(empty),)
        if m.readonly:
            return ExecMount(m.target, "overlay", lowerdirs=lowers, subpath=subpath, readonly=True)
        upper, overlay_work = scratch / "upper", scratch / "work"
        upper.mkdir(parents=True)
        overlay_work.mkdir()
        return ExecMount(
            m.target, "overlay", lowerdirs=lowers, upperdir=str(upper),
            workdir=str(overlay_work), subpath=subpath,
        )  # fmt: skip

    def _cache(
        self, m: llb.Mount, state: tuple[str, ...], stack: contextlib.ExitStack
    ) -> ExecMount:
        from dockbuild.engine.executor import ExecMount

        seed = None
        scope = ""
        source = m.input
        if isinstance(source, llb.SourceOp) and source.identifier.startswith("local://"):
            scope = self.input_key(source) + "\0" + m.selector
            local = self.locals[source.identifier[len("local://") :]]

            def seed(dest: Path) -> None:
                copy_local(local, m.selector, dest)

        elif source is not None:
            scope = self.input_key(source) + "\0" + m.selector
            layers = self.layer_paths(state)

            def seed(dest: Path) -> None:
                copy_merged(layers, m.selector, dest)

        path = stack.enter_context(
            self.cache.use(
                m.cache_id or m.target,
                scope,
                m.sharing,
                seed,
                m.mode,
                m.uid,
                m.gid,
                self.cancelled,
            )  # fmt: skip
        )
        return ExecMount(m.target, "bind", source=str(path), readonly=m.readonly)
