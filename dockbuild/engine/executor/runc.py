"""The runc back end (``--executor runc``): one ``runc run`` per RUN, with a generated spec.

Each run is ``unshare --mount`` around a small shell script: it mounts the overlay rootfs
(and the overlays and secret tmpfs of RUN mounts) inside that private mount namespace,
then ``exec runc run``. When runc exits, or is killed, the namespace and every mount in
it vanish with it, so nothing stays mounted on the host. The OCI runtime spec is what
BuildKit's runc worker generates: docker's default capabilities (all of them with
``--security=insecure``), masked and read-only /proc paths, a fresh PID/IPC/UTS/mount
namespace, a network namespace (the isolated default's, made ahead by
``engine.network`` and given by path; a fresh one for ``--network=none``, where runc
brings ``lo`` up), hostname
``buildkitsandbox``, and our own /etc/hosts and /etc/resolv.conf.

runc creates missing mount points in the rootfs; they are removed from the upper dir
afterwards when the process left them empty, as BuildKit's MountStubsCleaner does.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockbuild.engine.executor import (
    HOST_LOOPBACK_IP,
    ExecMount,
    OutputSink,
    OverlayRootfs,
    RunRequest,
    host_gateway,
)
from dockbuild.engine.executor.forkserver.container import (
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH,
    environ,
    hosts_file,
    resolv_conf,
)
from dockbuild.engine.executor.forkserver.mounts import MASKED_PATHS, READONLY_PATHS, is_opaque
from dockbuild.engine.executor.forkserver.syscalls import SetupError
from dockbuild.engine.executor.forkserver.users import User, resolve_user
from dockbuild.engine.network import BuildNetwork, StepNetwork
from dockbuild.errors import ExecutorError

CAPABILITY_NAMES = {
    0: "CAP_CHOWN", 1: "CAP_DAC_OVERRIDE", 2: "CAP_DAC_READ_SEARCH", 3: "CAP_FOWNER",
    4: "CAP_FSETID", 5: "CAP_KILL", 6: "CAP_SETGID", 7: "CAP_SETUID", 8: "CAP_SETPCAP",
    9: "CAP_LINUX_IMMUTABLE", 10: "CAP_NET_BIND_SERVICE", 11: "CAP_NET_BROADCAST",
    12: "CAP_NET_ADMIN", 13: "CAP_NET_RAW", 14: "CAP_IPC_LOCK", 15: "CAP_IPC_OWNER",
    16: "CAP_SYS_MODULE", 17: "CAP_SYS_RAWIO", 18: "CAP_SYS_CHROOT", 19: "CAP_SYS_PTRACE",
    20: "CAP_SYS_PACCT", 21: "CAP_SYS_ADMIN", 22: "CAP_SYS_BOOT", 23: "CAP_SYS_NICE",
    24: "CAP_SYS_RESOURCE", 25: "CAP_SYS_TIME", 26: "CAP_SYS_TTY_CONFIG", 27: "CAP_MKNOD",
    28: "CAP_LEASE", 29: "CAP_AUDIT_WRITE", 30: "CAP_AUDIT_CONTROL", 31: "CAP_SETFCAP",
    32: "CAP_MAC_OVERRIDE", 33: "CAP_MAC_ADMIN", 34: "CAP_SYSLOG", 35: "CAP_WAKE_ALARM",
    36: "CAP_BLOCK_SUSPEND", 37: "CAP_AUDIT_READ", 38: "CAP_PERFMON", 39: "CAP_BPF",
    40: "CAP_CHECKPOINT_RESTORE",
}  # fmt: skip


@dataclass(eq=False)
class _Run:
    container_id: str
    process: subprocess.Popen[bytes] | None = None
    killed: bool = False


@dataclass(eq=False)
class _Bundle:
    """The files of one run, and what the shell script must mount before runc starts."""

    path: Path
    script: list[str] = field(default_factory=list)
    # One pipe per secret: the shell reads it into a tmpfs, we write the bytes.
    secret_pipes: list[tuple[int, int, bytes]] = field(default_factory=list)  # (r, w, data)
    network: StepNetwork | None = None  # the isolated default's namespace


class RuncExecutor:
    """Runs each RUN with ``runc run`` (needs root and the runc binary)."""

    name = "runc"
    mounts = True
    warning: str | None = None

    def __init__(self, binary: str | None = None) -> None:
        found = binary or shutil.which("runc")
        if found is None:
            raise ExecutorError(
                "runc is not installed", hint="install runc, or use --executor namespace"
            )
        if os.geteuid() != 0:
            raise ExecutorError(
                "the runc executor needs root here (rootless runc is not supported yet)",
                hint="use the default executor",
            )
        for tool in ("unshare", "mount"):
            if shutil.which(tool) is None:
                raise ExecutorError(f"the runc executor needs {tool} (util-linux)")
        self.binary = found
        from dockbuild.userns import in_user_namespace

        # Rootless (dockbuild's user namespace): overlayfs keeps its xattrs in user.*,
        # and sysfs can only be bound from the host.
        self.userns = in_user_namespace()
        self._xattr = ",userxattr" if self.userns else ""
        self.state = tempfile.mkdtemp(prefix="dockbuild-runc-")
        # An engine that forgets close() must still not leave the state dir behind.
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.state, True)
        self._lock = threading.Lock()
        self._runs: set[_Run] = set()
        self._closed = False
        self._count = 0
        self.network = BuildNetwork()

    # -- the Executor protocol ----------------------------------------------------------

    def run(self, request: RunRequest, output: OutputSink) -> int:
        if not isinstance(request.rootfs, OverlayRootfs):
            raise ExecutorError("the runc executor needs an overlay rootfs")
        with self._lock:
            if self._closed:
                raise ExecutorError("the executor was closed; the build is being cancelled")
            self._count += 1
            run = _Run(f"dockbuild-{os.getpid()}-{self._count}")
            self._runs.add(run)
        bundle = _Bundle(Path(tempfile.mkdtemp(prefix="b", dir=self.state)))
        try:
            if request.network == "default":
                bundle.network = self.network.step(output)
            spec, targets = self._spec(request, bundle)
            (bundle.path / "config.json").write_text(json.dumps(spec))
            return self._execute(run, request, bundle, output)
        finally:
            with self._lock:
                self._runs.discard(run)
            for read_end, write_end, _ in bundle.secret_pipes:
                for fd in (read_end, write_end):
                    with contextlib.suppress(OSError):
                        os.close(fd)
            with contextlib.suppress(OSError):
                _clean_stubs(request.rootfs, targets if "targets" in locals() else [])
            shutil.rmtree(bundle.path, ignore_errors=True)
            if bundle.network is not None:
                bundle.network.release()

    def start(self) -> None:
        pass  # runc is started for each run: nothing runs ahead

    def close(self) -> None:
        with self._lock:
            self._closed = True
            runs = list(self._runs)
        for run in runs:
            self._kill(run)
        self._finalizer()
        self.network.close()

    # -- internals ----------------------------------------------------------------------

    def _kill(self, run: _Run) -> None:
        run.killed = True
        subprocess.run(
            [self.binary, "--root", self.state, "kill", run.container_id, "KILL"],
            capture_output=True,
            check=False,
        )
        if run.process is not None:
            with contextlib.suppress(OSError):
                os.killpg(run.process.pid, signal.SIGKILL)

    def _execute(self, run: _Run, request: RunRequest, bundle: _Bundle, output: OutputSink) -> int:
        script = [
            "set -e",
            *bundle.script,
            "exec "
            + shlex.join([self.binary, "--root", self.state, "run", "--bundle", str(bundle.path),
                          run.container_id]),
        ]  # fmt: skip
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            run.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                 "\n".join(script)],
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                pass_fds=[r for r, _, _ in bundle.secret_pipes],
                start_new_session=True,  # Ctrl-C is the engine's to handle (close())
            )  # fmt: skip
        except OSError as e:
            os.close(out_r)
            os.close(err_r)
            raise ExecutorError(f"cannot start runc: {e}") from e
        finally:
            os.close(out_w)
            os.close(err_w)
        if self._closed:
            self._kill(run)
        for read_end, write_end, data in bundle.secret_pipes:
            os.close(read_end)  # the shell has its copy
            threading.Thread(target=_feed, args=(write_end, data), daemon=True).start()
        bundle.secret_pipes = []  # the feeders close the write ends
        try:
            _pump(out_r, err_r, output)
        except BaseException:
            self._kill(run)
            raise
        finally:
            code = run.process.wait()
        if run.killed:
            raise ExecutorError("the RUN step was cancelled")
        return code if code >= 0 else 128 - code

    def _spec(self, request: RunRequest, bundle: _Bundle) -> tuple[dict[str, Any], list[str]]:
        rootfs = request.rootfs
        assert isinstance(rootfs, OverlayRootfs)
        b = bundle.path
        (b / "rootfs").mkdir()
        options = (
            "lowerdir={},upperdir={},workdir={}".format(
                ":".join(rootfs.lowerdirs), rootfs.upperdir, rootfs.workdir
            )
            + self._xattr
        )
        bundle.script.append(_upper_overlay_mount(options, rootfs.workdir, b / "rootfs"))
        layers = [Path(p) for p in reversed(rootfs.lowerdirs)]
        user = self._user(request.user, layers, b)
        env = environ(list(request.env))
        env.setdefault("HOME", user.home)
        env.setdefault("PATH", DEFAULT_PATH)
        gateway = bundle.network.host_address if bundle.network is not None else HOST_LOOPBACK_IP
        extra_hosts = host_gateway(request.extra_hosts, gateway)
        (b / "hosts").write_text(hosts_file(request.hostname, extra_hosts))
        (b / "resolv.conf").write_text(
            bundle.network.resolv_conf if bundle.network is not None else resolv_conf(request.network)
        )
        insecure = request.security == "insecure"
        caps = [
            CAPABILITY_NAMES[c]
            for c in sorted(CAPABILITY_NAMES)
            if insecure or c in DEFAULT_CAPABILITIES
        ]
        if insecure:
            caps = [c for c in caps if _capability_in_bounding_set(c)]
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777",
                         f"size={request.shm_size}" if request.shm_size else "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "bind" if self.userns else "sysfs",
             "source": "/sys" if self.userns else "sysfs",
             "options": [*(["rbind"] if self.userns else []), "nosuid", "noexec", "nodev",
                         "ro" if not insecure else "rw"]},
            {"destination": "/etc/hosts", "type": "bind", "source": str(b / "hosts"), "options": ["rbind", "ro"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": str(b / "resolv.conf"),
             "options": ["rbind", "ro"]},
        ]  # fmt: skip
        targets = ["/proc", "/dev", "/sys", "/etc/hosts", "/etc/resolv.conf"]
        for index, m in enumerate(request.mounts):
            mounts.append(self._mount(m, index, bundle))
            targets.append(m.target)
        namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
        if request.network == "none":
            namespaces.append({"type": "network"})
        elif bundle.network is not None:
            # The isolated default: the namespace the main process made ahead, by path.
            namespaces.append({"type": "network", "path": bundle.network.path})
        if request.network not in ("default", "none", "host"):
            raise ExecutorError(f"unsupported network mode {request.network!r}")
        spec = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.groups},
                "args": list(request.args),
                "env": [f"{k}={v}" for k, v in env.items()],
                "cwd": request.cwd or "/",
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "noNewPrivileges": False,
            },
            "root": {"path": "rootfs", "readonly": False},
            "hostname": request.hostname,
            "mounts": mounts,
            "linux": {
                "namespaces": namespaces,
                "maskedPaths": [] if insecure else ["/" + p for p in MASKED_PATHS],
                "readonlyPaths": [] if insecure else ["/" + p for p in READONLY_PATHS],
            },
        }
        return spec, targets

    def _user(self, spec: str, layers: list[Path], bundle: Path) -> User:
        from dockbuild.engine.snapshots import read_file

        for name in ("passwd", "group"):
            (bundle / name).write_bytes(read_file(layers, f"/etc/{name}") or b"")
        try:
            return resolve_user(spec, str(bundle / "passwd"), str(bundle / "group"))
        except SetupError as e:
            raise ExecutorError(str(e)) from None

    def _mount(self, m: ExecMount, index: int, bundle: _Bundle) -> dict[str, Any]:
        b = bundle.path
        ro = ["ro"] if m.readonly else []
        if m.type == "tmpfs":
            return {"destination": m.target, "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "nodev", *m.options, *ro]}  # fmt: skip
        if m.type == "bind":
            source = m.source
            if m.subpath:
                source = os.path.join(source, _resolve(m.subpath, [Path(source)]))
            if not os.path.lexists(source):
                raise ExecutorError(f"bind mount source {source} does not exist")
            return {"destination": m.target, "type": "bind", "source": source,
                    "options": ["rbind", *ro]}  # fmt: skip
        if m.type == "overlay":
            where = b / f"m{index}"
            where.mkdir()
            layers = [Path(p) for p in reversed(m.lowerdirs)]
            if m.upperdir:
                options = (
                    "lowerdir={},upperdir={},workdir={}".format(
                        ":".join(m.lowerdirs), m.upperdir, m.workdir
                    )
                    + self._xattr
                )
                bundle.script.append(_upper_overlay_mount(options, m.workdir, where))
            elif len(m.lowerdirs) == 1:
                bundle.script.append(
                    shlex.join(["mount", "--bind", "-o", "ro", m.lowerdirs[0], str(where)])
                )
            else:
                options = "lowerdir=" + ":".join(m.lowerdirs)
                bundle.script.append(
                    shlex.join(["mount", "-t", "overlay", "overlay", "-o", options, str(where)])
                )
            rel = _resolve(m.subpath, layers) if m.subpath else ""
            from dockbuild.engine.snapshots import lookup

            if rel and lookup(layers, rel) is None:
                raise ExecutorError(
                    f"failed to mount {m.target}: {m.subpath}: no such file or directory in the mount source"
                )
            return {"destination": m.target, "type": "bind", "source": str(where / rel) if rel else str(where),
                    "options": ["rbind", *ro]}  # fmt: skip
        if m.type == "secret":
            holder = b / f"s{index}"
            holder.mkdir()
            read_end, write_end = os.pipe()
            bundle.secret_pipes.append((read_end, write_end, m.data))
            size = max(4096, len(m.data) + 4096)
            path = str(holder / "secret")
            mode = 0o400 if m.mode is None else m.mode
            bundle.script += [
                shlex.join(
                    ["mount", "-t", "tmpfs", "-o", f"mode=700,size={size}", "tmpfs", str(holder)]
                ),
                f"cat /proc/self/fd/{read_end} > {shlex.quote(path)}",  # dash: one-digit fds only
                shlex.join(["chown", f"{m.uid or 0}:{m.gid or 0}", path]),
                shlex.join(["chmod", f"{mode:o}", path]),
            ]
            return {
                "destination": m.target,
                "type": "bind",
                "source": path,
                "options": ["bind", "ro"],
            }
        raise ExecutorError(f"unsupported mount type {m.type!r} for {m.target}")


def _resolve(path: str, layers: list[Path]) -> str:
    from dockbuild.engine.snapshots import resolve_in_rootfs

    return resolve_in_rootfs(layers, path)


def _capability_in_bounding_set(name: str) -> bool:
    number = next(k for k, v in CAPABILITY_NAMES.items() if v == name)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapBnd:"):
                    return bool(int(line.split()[1], 16) >> number & 1)
    except OSError:
        pass
    return True


def _feed(fd: int, data: bytes) -> None:
    try:
        if data:
            os.write(fd, data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _pump(out_r: int, err_r: int, output: OutputSink) -> None:
    streams = {out_r: "stdout", err_r: "stderr"}
    with selectors.DefaultSelector() as selector:
        try:
            for fd, name in streams.items():
                selector.register(fd, selectors.EVENT_READ, name)
            while streams:
                for key, _ in selector.select():
                    data = os.read(key.fd, 65536)
                    if data:
                        output(key.data, data)
                    else:
                        selector.unregister(key.fd)
                        del streams[key.fd]
        finally:
            os.close(out_r)
            os.close(err_r)


def _clean_stubs(rootfs: OverlayRootfs, targets: list[str]) -> None:
    """Drop mount points runc created in the upper dir that the process left empty."""
    upper = rootfs.upperdir
    layers = [Path(p) for p in reversed(rootfs.lowerdirs)]
    from dockbuild.engine.snapshots import lookup

    for target in sorted(set(targets), key=lambda t: t.count("/"), reverse=True):
        rel = _resolve(target, layers).strip("/")
        while rel:
            path = os.path.join(upper, rel)
            try:
                st = os.lstat(path)
            except OSError:
                break
            in_lower = lookup(layers, rel) is not None
            if stat.S_ISDIR(st.st_mode):
                if os.listdir(path) or is_opaque(path):
                    break
            elif not (stat.S_ISREG(st.st_mode) and st.st_size == 0 and not in_lower):
                break
            parent_st = os.stat(os.path.dirname(path))
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(path)
            else:
                os.unlink(path)
            os.utime(os.path.dirname(path), ns=(parent_st.st_atime_ns, parent_st.st_mtime_ns))
            rel = os.path.dirname(rel)


def _upper_overlay_mount(options: str, workdir: str, where: Path) -> str:
    """The shell command mounting a writable overlay, ``volatile`` where the kernel has it
    (5.10): no syncfs of the whole filesystem when the mount ends (see the fork server's
    mount_upper_overlay, which also says why a reused work dir loses its marker)."""
    marker = shlex.quote(str(Path(workdir, "work", "incompat", "volatile")))
    plain = ["mount", "-t", "overlay", "overlay", "-o", options, str(where)]
    volatile = ["mount", "-t", "overlay", "overlay", "-o", options + ",volatile", str(where)]
    return (
        f"[ ! -e {marker} ] || rm -rf -- {marker}\n"
        f"{shlex.join(volatile)} 2>/dev/null || {shlex.join(plain)}"
    )
