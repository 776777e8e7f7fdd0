"""System calls the standard library lacks, through libc: mount, unshare, setns, prctl,
capabilities and pivot_root, with the constants they take."""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

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
PR_CAPBSET_DROP = 24
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
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


def setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype):
        raise _errno_error("setns")


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


def remove_capabilities(caps: tuple[int, ...]) -> None:
    """Take ``caps`` out of the bounding, effective, permitted and inheritable sets and
    clear the ambient set, keeping the rest: a root step cannot get them back at exec."""
    for cap in caps:
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0):
            raise SetupError(f"dropping capability {cap}: {os.strerror(ctypes.get_errno())}")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = ctypes.create_string_buffer(struct.pack("Ii", LINUX_CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(24)
    if _libc.capget(header, data):
        raise SetupError(f"capget: {os.strerror(ctypes.get_errno())}")
    sets = list(struct.unpack("6I", data.raw))  # effective, permitted, inheritable x2
    for cap in caps:
        half, bit = (0, cap) if cap < 32 else (3, cap - 32)
        for i in range(half, half + 3):
            sets[i] &= ~(1 << bit)
    if _libc.capset(header, ctypes.c_char_p(struct.pack("6I", *sets))):
        raise SetupError(f"capset: {os.strerror(ctypes.get_errno())}")


def set_no_new_privs() -> None:
    """No setuid bit or file capability grants anything at exec from now on."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        raise SetupError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")


def set_dumpable(dumpable: bool) -> None:
    """PR_SET_DUMPABLE: a non-dumpable process cannot be ptraced, nor its /proc/PID/mem,
    environ or fds read, without CAP_SYS_PTRACE (and its /proc entries become root's)."""
    if _libc.prctl(PR_SET_DUMPABLE, int(dumpable), 0, 0, 0):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")


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
