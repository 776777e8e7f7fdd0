"""The fork server's loop: run requests in, spare PID 1s forked ahead, exits reported."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import sys

from .container import init, prepare_namespaces
from .mounts import remove_stubs
from .syscalls import (
    CLONE_NEWIPC,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUTS,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    SetupError,
    mount,
    set_dumpable,
    set_parent_death_signal,
    setns,
    unshare,
)

# typing is never imported at run time (each module it loads makes every fork dearer).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_MESSAGE = 1 << 20
MAX_SECRETS = 64  # secret mounts per RUN (each one a descriptor in the request)


# ---------------------------------------------------------------------------------------
# The server loop


class Container:
    """A running PID 1, as the server tracks it until it has reported the exit."""

    def __init__(self, spec: dict[str, Any], status: socket.socket, stubs_r: int) -> None:
        self.spec = spec
        self.status = status
        self.stubs_r = stubs_r
        self.stubs = bytearray()


class Spare:
    """A PID 1 forked before its request: it waits for the request on ``sock``."""

    def __init__(self, pid: int, sock: socket.socket, stubs_r: int) -> None:
        self.pid = pid
        self.sock = sock
        self.stubs_r = stubs_r

    def discard(self) -> None:
        self.sock.close()  # EOF: it exits (or, gone already, it is reaped as usual)
        os.close(self.stubs_r)


class Server:
    """Waits for run requests and container exits, single-threaded, in one select loop.

    One PID 1 is kept forked ahead (the spare), made while the step before runs (the
    main process only waits then): a request costs no fork and no namespace set-up.
    """

    def __init__(self, control_fd: int, sandbox: str) -> None:
        self.sandbox = sandbox
        self.control = socket.socket(fileno=control_fd)
        self.control.set_inheritable(False)
        self.selector = selectors.DefaultSelector()
        self.containers: dict[int, Container] = {}
        # PID 1s check this pipe for EOF to notice that the server died before their
        # prctl(PR_SET_PDEATHSIG) took effect.
        self.life_r, self.life_w = os.pipe()
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        # PIDs we report mean nothing to the main process when we are PID 1 of our own
        # PID namespace (see enter_own_pid_namespace): it must use the pidfd only.
        self.nested = os.getpid() == 1
        self.user_namespace = in_user_namespace()
        # Where each PID 1 mounts its private tmpfs (root mountpoint, /etc/hosts, ...).
        # It stays empty on the host; the server removes it when it ends, which it does
        # even when the main process is killed (EOF on the control socket).
        # (Not the tempfile module: its imports would make every fork dearer.)
        self.scratch = os.path.join(
            os.environ.get("TMPDIR") or "/tmp", f"dockbuild-exec-{os.urandom(6).hex()}"
        )
        os.mkdir(self.scratch, 0o700)
        self.spare: Spare | None = None

    def serve(self) -> None:
        # No cyclic GC: a collection touches every object, and after a fork every page
        # touched is copied (in the server and in the PID 1 being set up). The server
        # makes next to no reference cycles; reference counting frees the rest.
        gc.disable()
        try:
            _send(self.control, {"probe": probe() if self.sandbox == "namespace" else None})
            self.loop()
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(self.scratch)

    def loop(self) -> None:
        # Ctrl-C reaches the whole foreground process group; the engine decides what a
        # Ctrl-C means (Executor.close), so the server must not die on its own.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.ignored_signals = [
            sig
            for sig in signal.valid_signals()
            if sig not in (signal.SIGKILL, signal.SIGSTOP)
            and signal.getsignal(sig) == signal.SIG_IGN
        ]
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(wake_r, selectors.EVENT_READ, "wake")
        self.keep_spare()
        while True:
            for key, _ in self.selector.select():
                if key.data == "control":
                    message, fds, _flags, _addr = socket.recv_fds(
                        self.control, MAX_MESSAGE, 3 + MAX_SECRETS
                    )
                    if not message:
                        return  # the main process closed us (or died): PID 1s die with us
                    self.start(message, fds)
                    # The next PID 1 is made while this one runs: the main process waits
                    # meanwhile, so there is a CPU free for it.
                    self.keep_spare()
                elif key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 512):
                            pass
                    self.reap()
                else:
                    self.read_stubs(key.data)

    def start(self, message: bytes, fds: list[int]) -> None:
        for fd in fds:
            os.set_inheritable(fd, False)
        if len(fds) < 3:
            print("dockbuild fork server: bad request", file=sys.stderr)
            for fd in fds:
                os.close(fd)
            return
        status = socket.socket(fileno=fds[2])
        try:
            spec = json.loads(message)  # the PID 1 reads it too; the server needs the rootfs
            if spec["sandbox"] != self.sandbox:
                raise ValueError(f"this server runs {self.sandbox} containers")
        except (ValueError, KeyError) as e:
            self.refuse(status, (fds[0], fds[1], *fds[3:]), f"bad run request: {e}")
            return
        spare, self.spare = self.spare, None
        for _attempt in range(2):
            try:
                if spare is None:
                    spare = self.spawn()
                # The PID 1 gets the message and its own copies of the descriptors.
                socket.send_fds(spare.sock, [message], fds)
                break
            except OSError as e:
                if spare is not None:
                    spare.discard()  # died before its request (killed?): fork afresh
                    spare = None
                error = e
        else:
            self.refuse(status, (fds[0], fds[1], *fds[3:]), str(error))
            return
        spare.sock.close()
        for fd in (fds[0], fds[1], *fds[3:]):
            os.close(fd)
        try:
            pidfd = os.pidfd_open(spare.pid)
        except OSError:  # old kernel or seccomp: the main process falls back to kill(pid)
            _send(status, {"pid": spare.pid, "local": self.nested})
        else:
            _send(status, {"pid": spare.pid, "local": self.nested}, [pidfd])
            os.close(pidfd)
        os.set_blocking(spare.stubs_r, False)
        container = Container(spec, status, spare.stubs_r)
        self.containers[spare.pid] = container
        self.selector.register(spare.stubs_r, selectors.EVENT_READ, container)

    def keep_spare(self) -> None:
        if self.spare is None:
            # On failure a request forks for itself, and reports the error.
            with contextlib.suppress(OSError):
                self.spare = self.spawn()

    def spawn(self) -> Spare:
        """Fork a PID 1 that prepares what does not depend on the request, then waits."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stubs_r, stubs_w = os.pipe()
        namespace = self.sandbox == "namespace"
        try:
            if namespace:
                # Applies to the next child only, which becomes PID 1 of a new PID
                # namespace; setns afterwards points our future children back at our
                # own, so the next run can unshare again. (No intermediate process.)
                unshare(CLONE_NEWPID)
            pid = os.fork()
        except OSError:
            if namespace:
                self.reset_pid_namespace()
            ours.close()
            theirs.close()
            os.close(stubs_r)
            os.close(stubs_w)
            raise
        if pid == 0:
            try:
                # Only what this PID 1 needs: a spare waits for long, and copies of other
                # runs' descriptors (their status sockets, ...) would keep them from EOF.
                _close_fds_except({theirs.fileno(), stubs_w, self.life_r})
                pid1(self, theirs, stubs_w)
            finally:
                os._exit(1)  # never back into the server loop
        if namespace:
            self.reset_pid_namespace()
        theirs.close()
        os.close(stubs_w)
        return Spare(pid, ours, stubs_r)

    def reset_pid_namespace(self) -> None:
        try:
            setns(self.own_pid_ns, CLONE_NEWPID)
        except OSError as e:
            # Every later run would land in a dead namespace: better stop visibly.
            print(f"dockbuild fork server: {e}", file=sys.stderr)
            os._exit(1)

    def refuse(self, status: socket.socket, fds: tuple[int, ...], reason: str) -> None:
        _send(status, {"error": f"cannot create the container: {reason}"})
        status.close()
        for fd in fds:
            os.close(fd)

    def read_stubs(self, container: Container) -> None:
        if container.stubs_r == -1:
            # Read to the end by reap() already, while the same select() also reported
            # the pipe readable.
            return
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(container.stubs_r, 65536):
                container.stubs += chunk
            self.selector.unregister(container.stubs_r)
            os.close(container.stubs_r)
            container.stubs_r = -1

    def reap(self) -> None:
        """Report every exited PID 1 (a spare that died is not replaced until a request)."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            container = self.containers.pop(pid, None)
            if container is None:
                if self.spare is not None and self.spare.pid == pid:
                    self.spare.discard()
                    self.spare = None
                continue
            if container.stubs_r != -1:
                self.read_stubs(container)  # the writer is dead: this reaches EOF
            code = os.waitstatus_to_exitcode(wait_status)
            if code < 0:
                code = 128 - code
            # PID 1 was the last process of its namespaces, so its mount namespace and
            # the overlay in it are gone: the upper dir can be cleaned now.
            done: dict[str, object] = {"exit": code}
            if container.stubs:
                try:
                    remove_stubs(container.spec, json.loads(container.stubs))
                except Exception as e:  # the main process shows it in the step's log
                    done["warning"] = f"cleaning mount stubs: {e!r}"
            _send(container.status, done)
            container.status.close()


def _send(sock: socket.socket, message: dict[str, object], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    with contextlib.suppress(OSError):  # the main process may have given up on this run
        if fds:
            socket.send_fds(sock, [data], fds)
        else:
            sock.send(data)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------
# PID 1


def _close_fds_except(keep: set[int]) -> None:
    low = 3
    for fd in sorted(fd for fd in keep if fd >= low):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def pid1(server: Server, sock: socket.socket, stubs_w: int) -> None:
    """A forked PID 1: prepare what needs no request, wait for it, become the container."""
    set_parent_death_signal(signal.SIGKILL)
    os.set_blocking(server.life_r, False)
    try:
        if os.read(server.life_r, 1) == b"":
            os._exit(1)  # the server died before our prctl: nobody would reap us
    except BlockingIOError:
        pass
    os.close(server.life_r)
    signal.set_wakeup_fd(-1)
    # A process group of its own (the chroot executor kills the step by it). Not setsid:
    # a new session also makes a new scheduler autogroup, which costs about a millisecond.
    os.setpgid(0, 0)
    os.umask(0o022)
    early: BaseException | None = None
    if server.sandbox == "namespace":
        try:
            prepare_namespaces(server.scratch, server.user_namespace)
        except (SetupError, OSError) as e:
            early = e  # reported on the request's status socket
    message, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 3 + MAX_SECRETS)
    if not message:
        os._exit(0)  # no request will come (the server is ending)
    sock.close()
    out_fd, err_fd, status_fd = fds[:3]
    status = socket.socket(fileno=status_fd)
    try:
        if early is not None:
            raise early
        spec = json.loads(message)
        spec["scratch"] = server.scratch
        spec["secret_fds"] = fds[3:]  # secret bytes come as memfds, never in the message
        spec["ignored_signals"] = server.ignored_signals
        spec["user_namespace"] = server.user_namespace
        init(spec, out_fd, err_fd, status, stubs_w)
    except SetupError as e:
        _send(status, {"error": str(e)})
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        _send(status, {"error": f"{e.strerror or e}{where}"})
    except BaseException as e:
        _send(status, {"error": f"internal error setting up the container: {e!r}"})


# ---------------------------------------------------------------------------------------
# Probe


def probe() -> dict[str, object]:
    """Can this process make a container? Tries what a run does: unshare, private mounts,
    a fresh /proc inside a new PID namespace."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        message = "ok"
        try:
            unshare(CLONE_NEWPID)
            child = os.fork()
            if child == 0:
                try:
                    unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)
                    mount(None, "/", None, MS_REC | MS_PRIVATE)
                    try:
                        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                        os.write(w, b"ok")
                    except SetupError:
                        mount("/proc", "/proc", None, MS_BIND | MS_REC)
                        os.write(w, b"ok-bind")
                except (OSError, SetupError) as e:
                    os.write(w, str(e).encode())
                os._exit(0)
            os.waitpid(child, 0)
            message = ""
        except OSError as e:
            message = str(e)
        if message:
            os.write(w, message.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    message = _read_all(r).decode() or "the probe process died"
    works = message in ("ok", "ok-bind")
    return {
        "namespaces": works,
        "proc": "bind" if message == "ok-bind" else "fresh",
        "reason": "" if works else message,
    }


def in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def enter_own_pid_namespace() -> None:
    """In a user namespace, serve from a PID namespace that namespace owns.

    The server makes each run's PID namespace with unshare, then points its later
    children back at its own with setns, which needs CAP_SYS_ADMIN over the user
    namespace owning that PID namespace: the host's is not ours. So this process
    unshares once and forks the real server as PID 1 of a namespace we own; it stays
    only to pass on the server's exit status. (The main process kills runs by pidfd.)
    """
    unshare(CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _, wait_status = os.waitpid(pid, 0)
    os._exit(max(0, os.waitstatus_to_exitcode(wait_status)))


def main(argv: list[str]) -> None:
    if argv[2] == "chroot":
        # Chroot steps run as root beside us: they must not ptrace us or read our memory.
        set_dumpable(False)
    if in_user_namespace():
        enter_own_pid_namespace()
    Server(int(argv[1]), argv[2]).serve()
    # The main process waits for this exit at the end of every build: no interpreter
    # teardown (nothing is left to flush or close that the kernel does not).
    sys.stderr.flush()
    os._exit(0)
