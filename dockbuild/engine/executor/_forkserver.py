"""The fork server: the single-threaded process that makes and starts every container.

dockbuild's main process runs solver threads, and forking Python code out of a
multi-threaded process is unsafe (locks held by other threads stay locked in the child,
and ``unshare(CLONE_NEWUSER)`` fails with EINVAL). So :mod:`.namespace` starts this file
once per build as a script (``python -I -S _forkserver.py FD SANDBOX``). It imports
nothing from dockbuild and few standard modules (every page it holds makes each fork
dearer), so it starts fast and stays single-threaded.

Per run, the main process sends one SOCK_SEQPACKET message on the control socket: a JSON
spec plus three descriptors (the stdout and stderr pipe write ends, and a per-run status
socket), and memfds for secrets. The server passes it on to a spare PID 1: a child it
forked in advance (into a new PID namespace: unshare, fork, then setns back to its own),
which has already made the parts of a container that need no request (its namespaces,
the scratch tmpfs, /proc, /dev and /sys) and waits on a socket of its own. The server
then forks the next spare while this run goes on, and goes back to its select loop,
which also reaps exited PID 1s::

    fork server ── spare PID 1 (unshare NS|IPC|UTS, scratch tmpfs, /proc, /dev, /sys;
                   wait for a request; [unshare NET,] overlay and RUN mounts, pivot_root,
                   drop to USER, execve the RUN command)

Messages on the status socket, one JSON object each: ``{"pid": N}`` with a pidfd for
PID 1 (so the main process can kill it), ``{"error": "..."}`` when setup failed, and
finally ``{"exit": N}`` (128+N for signal N), sent after the mount stubs are cleaned.

Its first message on the control socket says it is ready and, for the namespace
sandbox, whether namespaces work here (``probe``): the executor choice reads it, and a
server whose answer is yes is the one the build then uses (choice.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import json
import os
import selectors
import signal
import socket
import stat
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

# pivot_root has no glibc wrapper.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

MAX_MESSAGE = 1 << 20
MAX_SECRETS = 64  # secret mounts per RUN (each one a descriptor in the request)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Mount options that are flags for mount(2) rather than data for the file system.
MOUNT_FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
IGNORED_OPTIONS = {"rw", "suid", "dev", "exec", "bind", "rbind", "private", "rprivate"}

# What runc (and so BuildKit) hides from a container's /proc and /sys: the process runs
# with root's capabilities, and these would let it poke at the host kernel.
MASKED_PATHS = (
    "proc/acpi", "proc/kcore", "proc/keys", "proc/latency_stats", "proc/timer_list",
    "proc/timer_stats", "proc/sched_debug", "proc/scsi", "sys/firmware",
)  # fmt: skip
READONLY_PATHS = ("proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_SYMLINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("core", "/proc/kcore"),
    ("ptmx", "pts/ptmx"),
)


# Docker's (and so BuildKit's) default capability set for a RUN step; --security=insecure
# keeps them all.
DEFAULT_CAPABILITIES = (
    0,  # CHOWN
    1,  # DAC_OVERRIDE
    3,  # FOWNER
    4,  # FSETID
    5,  # KILL
    6,  # SETGID
    7,  # SETUID
    8,  # SETPCAP
    10,  # NET_BIND_SERVICE
    13,  # NET_RAW
    18,  # SYS_CHROOT
    27,  # MKNOD
    29,  # AUDIT_WRITE
    31,  # SETFCAP
)
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class SetupError(Exception):
    """The container could not be set up; the message goes to the user as is."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def _errno_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _enc(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    if _libc.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data) if data else None):
        err = ctypes.get_errno()
        what = fstype or source or "remount"
        raise SetupError(f"mounting {what} on {target}: {os.strerror(err)}")


def mount_upper_overlay(
    target: str, lowers: list[str], upper: str, work: str, userxattr: bool | None
) -> None:
    """A writable overlay, ``volatile``: no syncfs of the upper dir's filesystem when it
    is unmounted. Without it, every RUN's end waits for the whole filesystem (every other
    process's writes too) to reach the disk, which takes from milliseconds to far longer
    on a busy machine. The layer is as durable as the rest of the cache (written back
    by the kernel in its own time; a kill -9 loses nothing), like the exports."""
    options = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
    if userxattr:
        options += ",userxattr"
    # A volatile mount leaves work/incompat/volatile behind, and the kernel refuses to
    # mount on that work dir again until it is gone. Ours are fresh per run; a caller
    # reusing one (after a clean end: a crash leaves nothing we reuse) gets it cleared.
    marker = os.path.join(work, "work", "incompat", "volatile")
    if os.path.lexists(marker):
        for name in os.listdir(marker):  # "dirty"
            os.unlink(os.path.join(marker, name))
        os.rmdir(marker)
    try:
        mount("overlay", target, "overlay", 0, options + ",volatile")
    except SetupError:
        mount("overlay", target, "overlay", 0, options)  # a kernel before 5.10


def unshare(flags: int) -> None:
    if _libc.unshare(flags):
        raise _errno_error("unshare")


def set_parent_death_signal(sig: int) -> None:
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0):
        raise _errno_error("prctl(PR_SET_PDEATHSIG)")


def _last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


LAST_CAPABILITY = _last_capability()  # read once, in the server: the kernel's, fixed


def drop_bounding_capabilities(keep: tuple[int, ...]) -> None:
    """Remove every capability but ``keep`` from the bounding set (needs CAP_SETPCAP)."""
    for cap in range(LAST_CAPABILITY + 1):
        if cap not in keep and _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0):
            raise SetupError(f"dropping capability {cap}: {os.strerror(ctypes.get_errno())}")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def set_capabilities(caps: tuple[int, ...]) -> None:
    """capset(2): effective, permitted and inheritable become exactly ``caps``."""
    low = sum(1 << c for c in caps if c < 32)
    high = sum(1 << (c - 32) for c in caps if c >= 32)
    header = struct.pack("Ii", LINUX_CAPABILITY_VERSION_3, 0)
    data = struct.pack("6I", low, low, low, high, high, high)
    if _libc.capset(ctypes.c_char_p(header), ctypes.c_char_p(data)):
        raise SetupError(f"capset: {os.strerror(ctypes.get_errno())}")


def pivot_root(root: str) -> None:
    """Make ``root`` the root: pivot_root(".", ".") stacks the old root on top, detach it."""
    machine = os.uname().machine
    number = SYS_PIVOT_ROOT.get(machine)
    if number is None:
        raise SetupError(f"pivot_root: unsupported architecture {machine}")
    os.chdir(root)
    if _libc.syscall(number, b".", b"."):
        raise SetupError(f"pivot_root: {os.strerror(ctypes.get_errno())}")
    if _libc.umount2(b".", MNT_DETACH):
        raise SetupError(f"detaching the old root: {os.strerror(ctypes.get_errno())}")
    os.chdir("/")


# ---------------------------------------------------------------------------------------
# The server loop


class Container:
    """A running PID 1, as the server tracks it until it has reported the exit."""

    def __init__(self, spec: dict, status: socket.socket, stubs_r: int) -> None:
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
        self.user_namespace = _in_user_namespace()
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
        # Step reserved for rootless operation: enter the build's user namespace here,
        # once, before the first fork (the main process writes the id maps).
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
        if _libc.setns(self.own_pid_ns, CLONE_NEWPID):
            # Every later run would land in a dead namespace: better stop visibly.
            print(f"dockbuild fork server: {_errno_error('setns')}", file=sys.stderr)
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
            if container.stubs:
                try:
                    remove_stubs(container.spec, json.loads(container.stubs))
                except Exception as e:
                    print(f"dockbuild fork server: cleaning mount stubs: {e!r}", file=sys.stderr)
            _send(container.status, {"exit": code})
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


def init(spec: dict, out_fd: int, err_fd: int, status: socket.socket, stubs_w: int) -> None:
    """Become the container: mounts, root, user, then execve."""
    if spec["sandbox"] == "namespace":
        stubs: list[dict] = []
        try:
            enter_container_root(spec, stubs)
        finally:
            # Reported even after a failed setup: the stubs made so far must go too.
            os.write(stubs_w, json.dumps(stubs).encode())
            os.close(stubs_w)
    else:
        os.close(stubs_w)
        os.chroot(spec["rootfs"]["path"])
        os.chdir("/")
    user = resolve_user(spec["user"], "/etc/passwd", "/etc/group")
    env = _environ(spec["env"])
    env.setdefault("HOME", user.home)
    cwd = spec["cwd"] or "/"
    # Like BuildKit: a missing working directory is created (owned by root).
    try:
        os.makedirs(cwd, 0o755, exist_ok=True)
        os.chdir(cwd)
    except OSError as e:
        raise SetupError(f"cannot use {cwd} as working directory: {e.strerror}") from None
    null = os.open("/dev/null", os.O_RDONLY) if os.path.exists("/dev/null") else None
    if null is None:  # chroot without /dev: an empty pipe is as good as /dev/null
        null, w = os.pipe()
        os.close(w)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    sandboxed = spec["sandbox"] == "namespace" and spec.get("security") != "insecure"
    if sandboxed:
        drop_bounding_capabilities(DEFAULT_CAPABILITIES)
    try:
        os.setgroups(user.groups)
    except PermissionError:
        # A single-ID user namespace denies setgroups: keep the groups we have.
        if user.groups != [user.gid] and user.groups != [0]:
            raise SetupError(
                "cannot set supplementary groups in this user namespace "
                "(single-ID mapping: add a subuid/subgid range)"
            ) from None
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)  # a non-zero uid loses every capability
    if sandboxed and user.uid == 0:
        set_capabilities(DEFAULT_CAPABILITIES)
    args = spec["args"]
    if not args:
        raise SetupError("no command given")
    # PATH is looked up after dropping privileges, so "executable" means for this user.
    program = _look_path(args[0], env.get("PATH", DEFAULT_PATH))
    if program is None:
        _exec_failed(f'exec: "{args[0]}": executable file not found in $PATH', 127)
    # execve resets caught signals but keeps ignored ones (Python ignores SIGPIPE and
    # SIGXFSZ, the server SIGINT, and whoever started dockbuild maybe more).
    for sig in spec["ignored_signals"]:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    status.close()
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    try:
        os.execve(program, args, env)
    except OSError as e:
        _exec_failed(f'exec: "{program}": {e.strerror.lower()}', 127 if e.errno == 2 else 126)


def _exec_failed(message: str, code: int) -> None:
    """Report like a shell does: a message on the RUN's stderr, and 127 or 126."""
    with contextlib.suppress(OSError):
        os.write(2, f"dockbuild: {message}\n".encode())
    os._exit(code)


def _environ(env: list[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if sep and key:
            result[key] = value
    return result


def _look_path(name: str, path: str) -> str | None:
    """What runc's exec.LookPath does: a name with a slash as is, else search PATH."""
    if "/" in name:
        return name
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.stat(candidate).st_mode) and os.access(candidate, os.X_OK):
                return candidate
    return None


# ---------------------------------------------------------------------------------------
# Namespaces and mounts


def prepare_namespaces(scratch: str, user_namespace: bool) -> None:
    """The part of a container that needs no request: done by a spare PID 1 in advance.

    These namespaces are made here in PID 1, not by the server, so that they die with
    it: when PID 1 has been reaped the overlay is unmounted and the upper dir is final.
    Mounts become slaves (as runc makes them) before the first mount, so nothing
    propagates to the host, while host mounts made before the request still show.
    """
    try:
        unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)
    except OSError as e:
        raise SetupError(f"cannot create the container's namespaces: {e.strerror}") from None
    mount(None, "/", None, MS_REC | MS_SLAVE)
    # A tmpfs on the executor's scratch dir, visible only in this mount namespace: the
    # root's mountpoint and the generated /etc files live there, nothing on the host.
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, "mode=700,size=1m")
    os.mkdir(os.path.join(scratch, "root"))
    _stub_layer(scratch)
    # What most requests want, moved into the root when the request comes (we are
    # PID 1 of the new PID namespace already, so /proc can be mounted now).
    prepared = os.path.join(scratch, "prepared")
    for name in ("", "proc", "dev", "sys"):
        os.mkdir(os.path.join(prepared, name), 0o755)
    _mount_proc(os.path.join(prepared, "proc"), masked=True)
    _mount_dev(os.path.join(prepared, "dev"), user_namespace)
    _mount_sys(os.path.join(prepared, "sys"), insecure=False)


def enter_container_root(spec: dict, stubs: list[dict]) -> None:
    """Build the container's mount tree in the prepared namespaces, pivot_root into it.

    Order matters: /proc can only be mounted by a process inside the new PID namespace
    (that is us, PID 1), and everything that needs a host path (devices, bind sources)
    happens before pivot_root hides the host.
    """
    network = spec["network"]
    if network == "none":
        try:
            unshare(CLONE_NEWNET)
        except OSError as e:
            raise SetupError(f"cannot create the container's network: {e.strerror}") from None
    scratch = spec["scratch"]
    root = os.path.join(scratch, "root")
    rootfs = spec["rootfs"]
    upper: str | None = None
    if rootfs["kind"] == "overlay":
        upper = rootfs["upperdir"]
        lowers = [*rootfs["lowerdirs"], os.path.join(scratch, "stubs")]
        mount_upper_overlay(root, lowers, upper, rootfs["workdir"], rootfs.get("userxattr"))
    else:
        mount(rootfs["path"], root, None, MS_BIND | MS_REC)
    place = Mountpoints(root, upper, stubs)

    # /proc, /dev and /sys as prepared in advance (one move each), unless the request
    # wants them otherwise: unmasked (insecure), or a /sys of its own network.
    prepared = os.path.join(scratch, "prepared")
    insecure = spec.get("security") == "insecure"
    proc = place.directory("/proc")
    if insecure:
        _mount_proc(proc, masked=False)
    else:
        mount(os.path.join(prepared, "proc"), proc, None, MS_MOVE)
    dev = place.directory("/dev")
    mount(os.path.join(prepared, "dev"), dev, None, MS_MOVE)
    if spec.get("shm_size"):  # --shm-size: the prepared /dev/shm, resized
        shm_flags = MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC
        mount("tmpfs", os.path.join(dev, "shm"), None, shm_flags, f"mode=1777,size={spec['shm_size']}")
    sys_dir = place.directory("/sys")
    if insecure or network == "none":
        _mount_sys(sys_dir, insecure)
    else:
        mount(os.path.join(prepared, "sys"), sys_dir, None, MS_MOVE)

    hosts = os.path.join(scratch, "hosts")
    _write(hosts, hosts_file(spec["hostname"], spec.get("extra_hosts", [])))
    mount(hosts, place.file("/etc/hosts"), None, MS_BIND)
    resolv = os.path.join(scratch, "resolv.conf")
    _write(resolv, resolv_conf(network))
    mount(resolv, place.file("/etc/resolv.conf"), None, MS_BIND)

    for index, m in enumerate(spec["mounts"]):
        if m["type"] == "secret":
            m = {**m, "data_fd": spec["secret_fds"][m["data_fd"]]}
        _run_mount(m, index, scratch, place)

    socket.sethostname(spec["hostname"])
    if network == "none":
        bring_loopback_up()
    pivot_root(root)


# Mountpoints every container needs; images often lack /etc/hosts and /etc/resolv.conf.
STUB_DIRS = ("proc", "dev", "sys", "etc")
STUB_FILES = ("etc/hosts", "etc/resolv.conf")


def _stub_layer(scratch: str) -> None:
    """The overlay's bottom layer, on the scratch tmpfs: the usual mountpoints.

    Whatever the image has shadows it, so the merged view differs only by mountpoints
    that would otherwise be made as stubs in the upper dir (copying /etc up, and
    removed again afterwards). A stub here costs nothing and never reaches the upper dir.
    """
    layer = os.path.join(scratch, "stubs")
    os.mkdir(layer)
    for name in STUB_DIRS:
        os.mkdir(os.path.join(layer, name), 0o755)
    for name in STUB_FILES:
        os.close(os.open(os.path.join(layer, name), os.O_CREAT | os.O_WRONLY, 0o644))


def _run_mount(m: dict, index: int, scratch: str, place: Mountpoints) -> None:
    """One RUN mount (see executor.ExecMount), made before pivot_root."""
    flags, data = mount_options(m.get("options", []))
    if m["readonly"]:
        flags |= MS_RDONLY
    kind = m["type"]
    if kind in ("bind", "overlay"):
        if kind == "overlay":
            lowers = m["lowerdirs"]
            if not m.get("upperdir") and len(lowers) == 1:
                source = lowers[0]  # one read-only layer: a bind is enough
            else:
                source = os.path.join(scratch, f"m{index}")
                os.mkdir(source)
                if m.get("upperdir"):
                    mount_upper_overlay(
                        source, lowers, m["upperdir"], m["workdir"], m.get("userxattr")
                    )
                else:
                    mount("overlay", source, "overlay", 0, "lowerdir=" + ":".join(lowers))
        else:
            source = m["source"]
        if m.get("subpath"):
            # Resolved inside the source, like BuildKit's selector: symlinks stay in it.
            source = resolve_in_root(source, m["subpath"])
        if not os.path.lexists(source):
            if not m.get("subpath"):
                raise SetupError(f"bind mount source {source} does not exist")
            raise SetupError(
                f"failed to mount {m['target']}: {m['subpath']}: "
                "no such file or directory in the mount source"
            )
        target = place.directory(m["target"]) if os.path.isdir(source) else place.file(m["target"])
        mount(source, target, None, MS_BIND | MS_REC)
        if flags:
            remount(target, flags)
    elif kind == "tmpfs":
        mount("tmpfs", place.directory(m["target"]), "tmpfs", flags | MS_NOSUID | MS_NODEV, data)
    elif kind == "secret":
        # A private tmpfs per secret: its bytes live in memory only, and the mount dies
        # with the container's mount namespace.
        holder = os.path.join(scratch, f"m{index}")
        os.mkdir(holder)
        data = _read_memfd(m["data_fd"])
        size = max(4096, len(data) + 4096)
        mount("tmpfs", holder, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"mode=755,size={size}")
        path = os.path.join(holder, "secret")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        mode, uid, gid = m.get("mode"), m.get("uid"), m.get("gid")
        os.chown(path, uid or 0, gid or 0)
        os.chmod(path, 0o400 if mode is None else mode)
        remount(holder, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        target = place.file(m["target"])
        mount(path, target, None, MS_BIND)
        remount(target, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    else:
        raise SetupError(f"unsupported mount type {kind!r} for {m['target']}")


def _read_memfd(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _mount_dev(dev: str, user_namespace: bool) -> None:
    """A /dev like runc's: a tmpfs with a few host devices, pts, shm, mqueue.

    Like runc, the devices are made with mknod (no mount to make and tear down for each),
    except in a user namespace, where mknod is refused: there they are bind mounts.
    """
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_STRICTATIME, "mode=755,size=65536k")
    for name in DEVICES:
        target = os.path.join(dev, name)
        if user_namespace:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o666))
            mount(f"/dev/{name}", target, None, MS_BIND)
        else:
            os.mknod(target, stat.S_IFCHR | 0o666, os.stat(f"/dev/{name}").st_rdev)
            os.chmod(target, 0o666)  # past the umask
    for name, options, fstype, flags in (
        ("pts", "newinstance,ptmxmode=0666,mode=0620,gid=5", "devpts", MS_NOSUID | MS_NOEXEC),
        ("shm", "mode=1777,size=65536k", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC),
        ("mqueue", "", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    ):
        target = os.path.join(dev, name)
        os.mkdir(target, 0o755)
        try:
            mount(fstype, target, fstype, flags, options)
        except SetupError:
            if "gid=5" not in options:
                raise
            # A single-ID user namespace has no group 5 (tty): pts get our group.
            mount(fstype, target, fstype, flags, options.replace(",gid=5", ""))
    for name, link in DEV_SYMLINKS:
        os.symlink(link, os.path.join(dev, name))


def _mount_proc(proc: str, masked: bool) -> None:
    try:
        mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        # A docker container masks parts of its /proc, and the kernel then refuses a
        # fresh procfs in a user namespace: bind the one we see (it lists more
        # processes than the step's own, as BuildKit's no-process-sandbox mode does).
        mount("/proc", proc, None, MS_BIND | MS_REC)
    if masked:
        _mask_kernel_paths(proc, "proc/")


def _mount_sys(sys_dir: str, insecure: bool) -> None:
    sys_flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | (0 if insecure else MS_RDONLY)
    try:
        mount("sysfs", sys_dir, "sysfs", sys_flags)
    except SetupError:  # sysfs refused (e.g. a user namespace without a netns)
        mount("/sys", sys_dir, None, MS_BIND | MS_REC)
        if not insecure:
            remount_readonly(sys_dir)
    if not insecure:
        _mask_kernel_paths(sys_dir, "sys/")


def _mask_kernel_paths(base: str, prefix: str) -> None:
    """runc's masks for the ``prefix`` ("proc/" or "sys/") part, mounted on ``base``."""
    for rel in MASKED_PATHS:
        if rel.startswith(prefix):
            path = os.path.join(base, rel[len(prefix) :])
            if os.path.isdir(path):
                mount("tmpfs", path, "tmpfs", MS_RDONLY)
            elif os.path.exists(path):
                mount("/dev/null", path, None, MS_BIND)
    for rel in READONLY_PATHS:
        if rel.startswith(prefix):
            path = os.path.join(base, rel[len(prefix) :])
            if os.path.exists(path):
                mount(path, path, None, MS_BIND | MS_REC)
                remount_readonly(path)


def remount(target: str, flags: int) -> None:
    """Apply per-mount flags to a bind mount, keeping the ones it already has.

    A bind remount replaces the mount's flags; in a user namespace the kernel refuses to
    clear nosuid/nodev/noexec/atime flags it locked, so they are carried over.
    """
    current = os.statvfs(target).f_flag
    keep = current & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
    if current & os.ST_RELATIME:
        keep |= MS_RELATIME
    mount(None, target, None, MS_BIND | MS_REMOUNT | keep | flags)


def remount_readonly(target: str, flags: int = 0) -> None:
    remount(target, flags | MS_RDONLY)


def mount_options(options: list[str]) -> tuple[int, str]:
    """Split mount options into mount(2) flags and the file system's data string."""
    flags = 0
    data = []
    for option in options:
        if option in MOUNT_FLAGS:
            flags |= MOUNT_FLAGS[option]
        elif option not in IGNORED_OPTIONS:
            data.append(option)
    return flags, ",".join(data)


def bring_loopback_up() -> None:
    """A fresh network namespace has lo down; one ioctl brings it up (no netlink)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def hosts_file(hostname: str, extra_hosts: list[str]) -> str:
    lines = [
        f"127.0.0.1\tlocalhost {hostname}",
        "::1\tlocalhost ip6-localhost ip6-loopback",
    ]
    for entry in extra_hosts:
        # "name:ip" (docker's --add-host); the address may itself contain colons (IPv6).
        name, sep, address = entry.partition(":") if ":" in entry else entry.partition("=")
        if sep:
            lines.append(f"{address}\t{name}")
    return "\n".join(lines) + "\n"


def resolv_conf(network: str) -> str:
    if network == "none":
        return ""
    try:
        with open("/etc/resolv.conf") as f:
            return f.read()
    except OSError:
        return ""


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class Mountpoints:
    """Finds (or creates, as stubs) mount targets inside the root without leaving it.

    Targets are resolved like a chroot would, so a symlink in the image (say an
    absolute /etc/resolv.conf link) cannot make us mount over, or create files on, a host
    path. Anything created is recorded so the server can remove it afterwards if the
    process left it untouched (BuildKit's MountStubsCleaner).
    """

    def __init__(self, root: str, upper: str | None, stubs: list[dict]) -> None:
        self.root = root
        self.upper = upper
        self.stubs = stubs

    def directory(self, target: str) -> str:
        return self._prepare(target, directory=True)

    def file(self, target: str) -> str:
        return self._prepare(target, directory=False)

    def _prepare(self, target: str, directory: bool) -> str:
        path = resolve_in_root(self.root, target)
        if os.path.lexists(path):
            if directory and not os.path.isdir(path):
                raise SetupError(f"mount target {target} exists and is not a directory")
            if not directory and os.path.isdir(path):
                raise SetupError(f"mount target {target} is a directory, expected a file")
            return path
        parts = os.path.relpath(path, self.root).split("/")
        for i in range(len(parts)):
            rel = "/".join(parts[: i + 1])
            current = os.path.join(self.root, rel)
            if os.path.lexists(current):
                continue
            # Creating an entry copies its parent dirs up into the upper dir; note which
            # were not there before so the cleaner can drop them again if still empty.
            copied_up = []
            if self.upper is not None:
                copied_up = [
                    "/".join(parts[:j])
                    for j in range(1, i + 1)
                    if not os.path.lexists(os.path.join(self.upper, *parts[:j]))
                ]
            if i == len(parts) - 1 and not directory:
                os.close(os.open(current, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            else:
                os.mkdir(current, 0o755)
            self.stubs.append({"path": rel, "copied_up": copied_up})
        return path


def resolve_in_root(root: str, path: str) -> str:
    """Resolve ``path`` as seen from inside ``root``: symlinks and .. never leave it."""
    pending = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except OSError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 40:
                raise SetupError(f"too many levels of symbolic links in {path}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending[:0] = [p for p in target.split("/") if p not in ("", ".")]
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def remove_stubs(spec: dict, stubs: list[dict]) -> None:
    """Remove the mountpoints we created that the run left untouched (empty).

    Runs in the server after the container's mount namespace is gone, directly on
    the upper dir (or the plain rootfs). The parent's timestamps are kept, as BuildKit
    does, so removing a stub does not look like a change. Parent dirs that were copied up
    only because a stub was created in them are removed again when still empty.
    """
    rootfs = spec["rootfs"]
    base = rootfs["upperdir"] if rootfs["kind"] == "overlay" else rootfs["path"]
    copied_up: set[str] = set()
    for stub in reversed(stubs):
        copied_up.update(stub["copied_up"])
        path = os.path.join(base, stub["path"])
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                if os.listdir(path):
                    continue
            elif not stat.S_ISREG(st.st_mode) or st.st_size:
                continue
            parent = os.path.dirname(path)
            parent_st = os.stat(parent)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(path)
            else:
                os.unlink(path)
            os.utime(parent, ns=(parent_st.st_atime_ns, parent_st.st_mtime_ns))
    for rel in sorted(copied_up, key=lambda p: p.count("/"), reverse=True):
        path = os.path.join(base, rel)
        with contextlib.suppress(OSError):
            if os.listdir(path) or _is_opaque(path):
                continue
            parent = os.path.dirname(path)
            parent_st = os.stat(parent)
            os.rmdir(path)
            os.utime(parent, ns=(parent_st.st_atime_ns, parent_st.st_mtime_ns))


def _is_opaque(path: str) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        with contextlib.suppress(OSError):
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
    return False


# ---------------------------------------------------------------------------------------
# USER


class User:
    def __init__(self, uid: int, gid: int, groups: list[int], home: str) -> None:
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.home = home

    def __repr__(self) -> str:
        return f"User(uid={self.uid}, gid={self.gid}, groups={self.groups}, home={self.home!r})"


def _read_db(path: str, fields: int) -> list[list[str]]:
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            row = line.split(":")
            if len(row) >= fields:
                rows.append(row)
    return rows


def resolve_user(spec: str, passwd_path: str, group_path: str) -> User:
    """Resolve "name[:group]" or "uid[:gid]" the way runc does (BuildKit uses runc's code).

    "" is root. A numeric uid or gid needs no entry in the files; a name does. Without an
    explicit group, the supplementary groups are those that list the user as a member.
    """
    name, has_group, group = spec.partition(":")
    passwd = _read_db(passwd_path, 7)
    entry = None
    for row in passwd:
        if (name == "" and row[2] == "0") or row[0] == name or (name.isdigit() and row[2] == name):
            entry = row
            break
    if entry is not None:
        user_name, uid, gid, home = entry[0], int(entry[2]), int(entry[3]), entry[5] or "/"
    elif name == "" or name.isdigit():
        user_name, uid, gid, home = None, int(name or 0), 0, "/"
    else:
        raise SetupError(f"unable to find user {name}: no matching entries in passwd file")
    groups_db = _read_db(group_path, 4)
    if has_group:
        for row in groups_db:
            if row[0] == group or (group.isdigit() and row[2] == group):
                gid = int(row[2])
                break
        else:
            if not group.isdigit():
                raise SetupError(f"unable to find group {group}: no matching entries in group file")
            gid = int(group)
        groups = [gid]
    else:
        groups = [gid]
        if user_name is not None:
            for row in groups_db:
                if (
                    user_name in row[3].split(",")
                    and row[2].isdigit()
                    and int(row[2]) not in groups
                ):
                    groups.append(int(row[2]))
    return User(uid, gid, groups, home)


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


def _in_user_namespace() -> bool:
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
    if _in_user_namespace():
        enter_own_pid_namespace()
    Server(int(argv[1]), argv[2]).serve()
    # The main process waits for this exit at the end of every build: no interpreter
    # teardown (nothing is left to flush or close that the kernel does not).
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
