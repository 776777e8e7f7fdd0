"""Becoming the container: namespaces, the root and its mounts, then USER, and execve."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat

from .mounts import Mountpoints, mount_dev, mount_proc, mount_sys, run_mount, stub_layer
from .syscalls import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUTS,
    MS_BIND,
    MS_MOVE,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_REC,
    MS_REMOUNT,
    MS_SLAVE,
    SetupError,
    bring_loopback_up,
    drop_bounding_capabilities,
    mount,
    mount_upper_overlay,
    pivot_root,
    remove_capabilities,
    set_capabilities,
    set_no_new_privs,
    setns,
    unshare,
)
from .users import resolve_user

# typing is never imported at run time (each module it loads makes every fork dearer).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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
# What a chroot step loses (every other capability of dockbuild's process it keeps).
CHROOT_REMOVED_CAPABILITIES = (
    18,  # SYS_CHROOT
    19,  # SYS_PTRACE
    21,  # SYS_ADMIN
)


def init(spec: dict[str, Any], out_fd: int, err_fd: int, status: socket.socket, stubs_w: int) -> None:
    """Become the container: mounts, root, user, then execve."""
    if spec["sandbox"] == "namespace":
        stubs: list[dict[str, Any]] = []
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
        if spec.get("security") != "insecure":
            # The step runs as root beside dockbuild, with no namespace between them:
            # no second chroot to climb out of this one, no ptrace of dockbuild, no
            # mount (of /proc, to reach /proc/PID/root); nothing regained by setuid.
            remove_capabilities(CHROOT_REMOVED_CAPABILITIES)
            set_no_new_privs()
    user = resolve_user(spec["user"], "/etc/passwd", "/etc/group")
    env = environ(spec["env"])
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
        _exec_failed(f'exec: "{program}": {(e.strerror or str(e)).lower()}', 127 if e.errno == 2 else 126)


def _exec_failed(message: str, code: int) -> NoReturn:
    """Report like a shell does: a message on the RUN's stderr, and 127 or 126."""
    with contextlib.suppress(OSError):
        os.write(2, f"dockbuild: {message}\n".encode())
    os._exit(code)


def environ(env: list[str]) -> dict[str, str]:
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
    stub_layer(scratch)
    # What most requests want, moved into the root when the request comes (we are
    # PID 1 of the new PID namespace already, so /proc can be mounted now).
    prepared = os.path.join(scratch, "prepared")
    for name in ("", "proc", "dev", "sys"):
        os.mkdir(os.path.join(prepared, name), 0o755)
    mount_proc(os.path.join(prepared, "proc"), masked=True)
    mount_dev(os.path.join(prepared, "dev"), user_namespace)
    mount_sys(os.path.join(prepared, "sys"), insecure=False)


def enter_container_root(spec: dict[str, Any], stubs: list[dict[str, Any]]) -> None:
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
    own_network = network == "none" or "netns" in spec
    if "netns" in spec:
        # The isolated default: a namespace the main process made ahead (veth, address
        # and routes set), held there by a descriptor; joined by its /proc path.
        try:
            fd = os.open(spec["netns"], os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
        except OSError as e:
            raise SetupError(f"cannot join the step's network namespace: {e.strerror}") from None
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
        mount_proc(proc, masked=False)
    else:
        mount(os.path.join(prepared, "proc"), proc, None, MS_MOVE)
    dev = place.directory("/dev")
    mount(os.path.join(prepared, "dev"), dev, None, MS_MOVE)
    if spec.get("shm_size"):  # --shm-size: the prepared /dev/shm, resized
        shm_flags = MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC
        mount("tmpfs", os.path.join(dev, "shm"), None, shm_flags, f"mode=1777,size={spec['shm_size']}")
    sys_dir = place.directory("/sys")
    if insecure or own_network:
        mount_sys(sys_dir, insecure)
    else:
        mount(os.path.join(prepared, "sys"), sys_dir, None, MS_MOVE)

    hosts = os.path.join(scratch, "hosts")
    _write(hosts, hosts_file(spec["hostname"], spec.get("extra_hosts", [])))
    mount(hosts, place.file("/etc/hosts"), None, MS_BIND)
    resolv = os.path.join(scratch, "resolv.conf")
    _write(resolv, spec["resolv_conf"] if "resolv_conf" in spec else resolv_conf(network))
    mount(resolv, place.file("/etc/resolv.conf"), None, MS_BIND)

    for index, m in enumerate(spec["mounts"]):
        if m["type"] == "secret":
            m = {**m, "data_fd": spec["secret_fds"][m["data_fd"]]}
        run_mount(m, index, scratch, place)

    socket.sethostname(spec["hostname"])
    if network == "none":
        bring_loopback_up()
    pivot_root(root)


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
