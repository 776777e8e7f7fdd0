"""The built-in executor: Linux namespaces and overlayfs, set up by a fork server.

The main process is multi-threaded (solver threads), so it never forks Python code
itself: on the first run it starts one small single-threaded process, the fork server
(the ``forkserver`` package), and from then on each run is one message to it. The server
forks the container's PID 1; see ``forkserver`` for how, and for the order in which
namespaces and mounts are made. The RUN's stdout and stderr are pipes
created here and handed over with SCM_RIGHTS, so output streams straight from the
container to the :data:`OutputSink` without passing through the server.

Rootless, the whole dockbuild process already runs in the build's user namespace
(``dockbuild.userns``): the server inherits it, serves from a PID namespace of its own
(see ``forkserver.server.enter_own_pid_namespace``), and overlay mounts get ``userxattr``.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockbuild.engine.executor import (
    HOST_LOOPBACK_IP,
    OutputSink,
    OverlayRootfs,
    PlainRootfs,
    RunRequest,
    host_gateway,
)
from dockbuild.engine.network import BuildNetwork, StepNetwork
from dockbuild.errors import ExecutorError

FORKSERVER = Path(__file__).with_name("forkserver") / "__main__.py"
# SOCK_SEQPACKET messages are limited by the socket buffer (about 200 KiB by default).
MAX_SPEC_BYTES = 150_000
MAX_SECRETS = 64  # as the fork server accepts (descriptors per request)


@dataclass(eq=False)
class _Run:
    """What the main process knows about one running container."""

    pid: int | None = None
    pidfd: int | None = None
    killed: bool = False
    stubs: list[dict[str, Any]] = field(default_factory=list)

    def kill(self) -> None:
        self.killed = True
        # PID 1 dying takes the whole PID namespace with it; in chroot mode there is no
        # namespace, so the process group goes too.
        with contextlib.suppress(OSError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            elif self.pid is not None:
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            if self.pid is not None:
                os.killpg(self.pid, signal.SIGKILL)


@dataclass(eq=False)
class _ServerResources:
    """The fork server and what goes with it, apart from the executor for the finalizer."""

    server: subprocess.Popen[bytes] | None = None
    control: socket.socket | None = None


def _shutdown(resources: _ServerResources) -> None:
    server, control = resources.server, resources.control
    resources.server = resources.control = None
    if control is not None:
        # EOF on the control socket ends the server; PID 1s still running (or setting
        # up) die with it (PR_SET_PDEATHSIG), and their PID namespaces with them.
        control.close()
    if server is not None:
        # Woken when the server exits: Popen.wait(timeout) polls with growing sleeps
        # and saw a 10 ms exit 20 ms late.
        if not _exited(server, timeout=5):
            server.kill()
        server.wait()


def _exited(server: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether ``server`` ends within ``timeout`` seconds."""
    try:
        pidfd = os.pidfd_open(server.pid)
    except OSError:  # a kernel without pidfds (or reaped already): Popen's polling wait
        try:
            server.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(pidfd, selectors.EVENT_READ)
            return bool(selector.select(timeout))
    finally:
        os.close(pidfd)


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("dockbuild-secret", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


class ForkServerExecutor:
    """Shared by the namespace and chroot executors: the fork server and its protocol."""

    name = "forkserver"
    sandbox = ""
    mounts = False
    userxattr = False
    # Set when this executor was chosen as a fallback the user should hear about.
    warning: str | None = None
    # What the fork server found when it started (namespace sandbox): see choice.py.
    probe: dict[str, Any] | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resources = _ServerResources()
        self._runs: set[_Run] = set()
        self._closed = False
        self.network = BuildNetwork()
        # An engine that forgets close() must still not leave a fork server behind.
        self._finalizer = weakref.finalize(self, _shutdown, self._resources)

    # -- the Executor protocol ----------------------------------------------------------

    def run(self, request: RunRequest, output: OutputSink) -> int:
        secrets = [i for i, m in enumerate(request.mounts) if m.type == "secret"]
        if len(secrets) > MAX_SECRETS:
            raise ExecutorError(f"a RUN step may mount at most {MAX_SECRETS} secrets")
        step: StepNetwork | None = None
        if request.network == "default" and self.sandbox == "namespace":
            if self._closed:  # checked again, under the lock, when the run starts
                raise ExecutorError("the executor was closed; the build is being cancelled")
            step = self.network.step(output)
        try:
            return self._run(request, output, secrets, step)
        finally:
            if step is not None:
                step.release()

    def _run(
        self, request: RunRequest, output: OutputSink, secrets: list[int], step: StepNetwork | None
    ) -> int:
        spec = self._spec(request, {i: n for n, i in enumerate(secrets)})
        gateway = step.host_address if step is not None else HOST_LOOPBACK_IP
        spec["extra_hosts"] = host_gateway(request.extra_hosts, gateway)
        if step is not None:
            spec["netns"] = step.path
            spec["resolv_conf"] = step.resolv_conf
        elif request.network == "default":
            spec["network"] = "host"  # isolation impossible here, or config.toml's choice
        # Secret bytes go to the server as memfds: memory only, never in a message.
        memfds = [_memfd(request.mounts[i].data) for i in secrets]
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        status, status_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        run = _Run()
        try:
            with self._lock:
                if self._closed:
                    raise ExecutorError("the executor was closed; the build is being cancelled")
                control = self._ensure_server()
                data = json.dumps(spec).encode()
                if len(data) > MAX_SPEC_BYTES:
                    raise ExecutorError(
                        f"the RUN step is too large to start ({len(data)} bytes of "
                        "arguments and environment)"
                    )
                try:
                    socket.send_fds(
                        control, [data], [out_w, err_w, status_theirs.fileno(), *memfds]
                    )
                except OSError as e:
                    raise ExecutorError(
                        f"the {self.name} executor's fork server is gone: {e}"
                    ) from e
                self._runs.add(run)
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            status.close()
            raise
        finally:
            for fd in (out_w, err_w, *memfds):
                os.close(fd)
            status_theirs.close()
        try:
            return self._wait(run, out_r, err_r, status, output)
        finally:
            with self._lock:
                self._runs.discard(run)
            if run.pidfd is not None:
                os.close(run.pidfd)

    def start(self) -> None:
        with self._lock:
            if not self._closed:
                self._ensure_server()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            runs = list(self._runs)
        for run in runs:
            run.kill()
        self._finalizer()
        self.network.close()

    # -- internals ----------------------------------------------------------------------

    def _spec(self, request: RunRequest, secret_index: dict[int, int]) -> dict[str, Any]:
        rootfs = request.rootfs
        if isinstance(rootfs, OverlayRootfs):
            if not rootfs.lowerdirs:
                raise ExecutorError("an overlay rootfs needs at least one lower dir")
            rootfs_spec: dict[str, Any] = {
                "kind": "overlay",
                "lowerdirs": list(rootfs.lowerdirs),
                "upperdir": rootfs.upperdir,
                "workdir": rootfs.workdir,
                # In a user namespace overlayfs keeps its xattrs in user.overlay.*.
                "userxattr": self.userxattr,
            }
        elif isinstance(rootfs, PlainRootfs):
            rootfs_spec = {"kind": "plain", "path": rootfs.path}
        else:
            raise ExecutorError(f"unsupported rootfs {rootfs!r}")
        if request.network not in ("default", "none", "host"):
            raise ExecutorError(f"unsupported network mode {request.network!r}")
        if request.security not in ("sandbox", "insecure"):
            raise ExecutorError(f"unsupported security mode {request.security!r}")
        return {
            "sandbox": self.sandbox,
            "args": list(request.args),
            "env": list(request.env),
            "cwd": request.cwd,
            "user": request.user,
            "rootfs": rootfs_spec,
            "mounts": [
                {
                    "target": m.target,
                    "type": m.type,
                    "source": m.source,
                    "readonly": m.readonly,
                    "options": list(m.options),
                    "subpath": m.subpath,
                    "lowerdirs": list(m.lowerdirs),
                    "upperdir": m.upperdir,
                    "workdir": m.workdir,
                    "userxattr": self.userxattr,  # a rw overlay in a user namespace
                    # secret bytes travel as a memfd (see run), never in this message
                    "data_fd": secret_index.get(i),
                    "mode": m.mode,
                    "uid": m.uid,
                    "gid": m.gid,
                }
                for i, m in enumerate(request.mounts)
            ],
            "network": request.network,
            "security": request.security,
            "hostname": request.hostname,
            "extra_hosts": list(request.extra_hosts),
            "shm_size": request.shm_size,
        }

    def _server_command(self) -> list[str]:
        # -I -S: no site-packages, no environment: the server needs only the stdlib,
        # and this keeps its start-up (once per build) at a few tens of milliseconds.
        return [sys.executable, "-I", "-S", str(FORKSERVER)]

    def _ensure_server(self) -> socket.socket:
        """Start the fork server on first use (the caller holds the lock)."""
        res = self._resources
        if res.control is not None and res.server is not None:
            if res.server.poll() is None:
                return res.control
            raise ExecutorError(
                f"the {self.name} executor's fork server exited (status {res.server.returncode})"
            )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            res.server = subprocess.Popen(
                [*self._server_command(), str(theirs.fileno()), self.sandbox],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # Its own session: a Ctrl-C on the terminal is the engine's to handle.
                start_new_session=True,
            )
        except OSError as e:
            ours.close()
            raise ExecutorError(f"cannot start the {self.name} executor's fork server: {e}") from e
        finally:
            theirs.close()
        res.control = ours
        # The server's first message: ready, and (namespace sandbox) what its probe found.
        try:
            ours.settimeout(20)
            hello = json.loads(ours.recv(MAX_SPEC_BYTES) or b"null")
            ours.settimeout(None)
        except (OSError, ValueError) as e:
            hello = str(e)
        if not isinstance(hello, dict):
            raise ExecutorError(f"the {self.name} executor's fork server did not start ({hello or 'it exited'})")
        self.probe = hello.get("probe")
        return ours

    def _wait(
        self,
        run: _Run,
        out_r: int,
        err_r: int,
        status: socket.socket,
        output: OutputSink,
    ) -> int:
        error: str | None = None
        exit_code: int | None = None
        streams = {out_r: "stdout", err_r: "stderr"}
        with selectors.DefaultSelector() as selector:
            try:
                for fd, name in streams.items():
                    selector.register(fd, selectors.EVENT_READ, name)
                selector.register(status, selectors.EVENT_READ, "status")
                status_open = True
                while streams or status_open:
                    if run.killed and not status_open:
                        break  # don't wait for pipes an orphan might still hold
                    for key, _ in selector.select():
                        if key.data != "status":
                            data = os.read(key.fd, 65536)
                            if data:
                                output(key.data, data)
                            else:
                                selector.unregister(key.fd)
                                del streams[key.fd]
                            continue
                        message, fds, _flags, _addr = socket.recv_fds(status, 65536, 1)
                        if not message:
                            selector.unregister(status)
                            status_open = False
                            continue
                        event = json.loads(message)
                        if "pid" in event:
                            # A PID from the server's own PID namespace is not ours.
                            run.pid = None if event.get("local") else event["pid"]
                            run.pidfd = fds[0] if fds else None
                            if self._closed:
                                run.kill()
                        elif "error" in event:
                            error = event["error"]
                        elif "exit" in event:
                            exit_code = event["exit"]
                            if "warning" in event:
                                output("stderr", f"WARNING: {event['warning']}\n".encode())
            except BaseException:
                run.kill()  # an output sink that raised, a KeyboardInterrupt, ...
                raise
            finally:
                for fd in (out_r, err_r):
                    os.close(fd)
                status.close()
        if run.killed:
            raise ExecutorError("the RUN step was cancelled")
        if error is not None:
            raise ExecutorError(error)
        if exit_code is None:
            raise ExecutorError(f"the {self.name} executor's fork server died during the run")
        return exit_code


class NamespaceExecutor(ForkServerExecutor):
    """Runs each RUN in fresh mount/PID/IPC/UTS (and network) namespaces, as root."""

    name = "namespace"
    sandbox = "namespace"
    mounts = True

    def __init__(self) -> None:
        from dockbuild.userns import in_user_namespace

        if os.geteuid() != 0:
            raise ExecutorError(
                "the namespace executor needs root, or a user namespace of its own "
                "(the dockbuild command enters one by itself when run by a non-root user)",
                hint="run the dockbuild command, or use unshare --user --map-root-user",
            )
        super().__init__()
        self.userxattr = in_user_namespace()
