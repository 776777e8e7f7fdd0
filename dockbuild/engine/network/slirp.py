"""The rootless network: one namespace per build, connected by slirp4netns or pasta.

The build's user namespace owns the namespace, so its root can join it. The tool runs
outside, in the host's network, and relays the namespace's traffic through ordinary
sockets of the user; the host's loopback is not reachable (slirp4netns
``--disable-host-loopback``, pasta ``--no-map-gw``). It exits when the build does,
killed or not: it watches a pipe whose other end only this process holds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

from dockbuild.engine.network import (
    NetworkUnavailable,
    StepNetwork,
    fd_path,
    new_netns,
    resolv_conf,
)

SLIRP_RESOLVER = "10.0.2.3"
PASTA_RESOLVER = "169.254.1.1"  # pasta forwards it to the host's first resolver
TAP = "tap0"


def find_tool() -> tuple[str, str] | None:
    """("slirp4netns" | "pasta", its path), slirp4netns first, or None."""
    for name in ("slirp4netns", "pasta"):
        path = shutil.which(name)
        if path:
            return name, path
    return None


class SlirpNetwork:
    def __init__(self, kind: str, netns_fd: int, process: subprocess.Popen[bytes], exit_w: int, resolver: str) -> None:
        self.kind = kind
        self._fd = netns_fd
        self._process = process
        self._exit_w = exit_w
        self._step = StepNetwork(
            fd_path(netns_fd), resolv_conf((resolver,)), host_address(), lambda: None
        )

    @classmethod
    def open(cls) -> SlirpNetwork:
        tool = find_tool()
        if tool is None:
            raise NetworkUnavailable("rootless, and neither slirp4netns nor pasta is installed")
        kind, binary = tool
        try:
            fd = new_netns()
        except OSError as e:
            raise NetworkUnavailable(f"cannot create a network namespace: {e}") from None
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        os.set_inheritable(fd, True)
        path = f"/proc/self/fd/{fd}"
        if kind == "slirp4netns":
            command = [
                binary, "--configure", "--mtu=65520", "--disable-host-loopback",
                f"--ready-fd={ready_w}", f"--exit-fd={exit_r}",
                "--netns-type=path", path, TAP,
            ]  # fmt: skip
            resolver = SLIRP_RESOLVER
            pass_fds: tuple[int, ...] = (fd, ready_w, exit_r)
        else:
            # pasta has no exit descriptor: it stays in the foreground and is killed with
            # the thread that started it (setpriv --pdeathsig), or by close().
            setpriv = shutil.which("setpriv")
            command = [*([setpriv, "--pdeathsig", "KILL"] if setpriv else []),
                       binary, "--config-net", "--quiet", "--foreground", "--no-map-gw",
                       "--netns", path, "--dns-forward", PASTA_RESOLVER]  # fmt: skip
            resolver = PASTA_RESOLVER
            pass_fds = (fd,)
        import tempfile

        # Its messages go to a file, read if it fails: a pipe nobody reads would block it.
        with tempfile.TemporaryFile() as log:
            try:
                process = subprocess.Popen(
                    command, pass_fds=pass_fds, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                )  # fmt: skip
            except OSError as e:
                for x in (fd, ready_r, ready_w, exit_r, exit_w):
                    os.close(x)
                raise NetworkUnavailable(f"cannot start {kind}: {e}") from None
            os.set_inheritable(fd, False)
            for x in (ready_w, exit_r):
                os.close(x)
            try:
                if kind == "slirp4netns":
                    ready = os.read(ready_r, 1)
                else:
                    ready = b"1" if _wait_for_tap(fd) else b""
            finally:
                os.close(ready_r)
            if not ready:
                process.kill()
                process.wait()
                log.seek(0)
                err = log.read().decode(errors="replace").strip()
                os.close(fd)
                os.close(exit_w)
                raise NetworkUnavailable(f"{kind} did not start: {err or process.returncode}")
        return cls(kind, fd, process, exit_w, resolver)

    def take(self) -> StepNetwork:
        return self._step

    def close(self) -> None:
        os.close(self._exit_w)  # EOF: slirp4netns exits
        if self.kind == "pasta":
            self._process.terminate()
        with contextlib.suppress(Exception):
            self._process.wait(2)
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        os.close(self._fd)


def _wait_for_tap(netns_fd: int) -> bool:
    """pasta configures the namespace in the background: wait for its default route."""
    import threading
    import time

    from dockbuild.engine.executor.forkserver.syscalls import CLONE_NEWNET, setns

    found: list[bool] = [False]

    def look() -> None:
        setns(netns_fd, CLONE_NEWNET)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open("/proc/thread-self/net/route") as f:  # per thread: /proc/net would be the main thread's
                if any(line.split()[1:2] == ["00000000"] for line in f.readlines()[1:]):
                    found[0] = True
                    return
            time.sleep(0.005)

    thread = threading.Thread(target=look, name="dockbuild-pasta")
    thread.start()
    thread.join()
    return found[0]


def host_address() -> str:
    """The host's address on its default route: what a step behind slirp4netns or pasta
    reaches the host by (their gateway addresses are not the host: its loopback is
    closed to them). A UDP connect sends nothing; without a route, slirp4netns' host
    address (which --disable-host-loopback refuses, but names the intent)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never a real destination
            return str(probe.getsockname()[0])
        except OSError:
            return "10.0.2.2"
