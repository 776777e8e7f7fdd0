"""A container's mount tree: /proc, /dev and /sys, RUN mounts, and mount targets found or
made as stubs inside the root (and removed from the upper dir afterwards)."""

from __future__ import annotations

import contextlib
import os
import stat

from .syscalls import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_STRICTATIME,
    SetupError,
    mount,
    mount_options,
    mount_upper_overlay,
    remount,
    remount_readonly,
)

# typing is never imported at run time (each module it loads makes every fork dearer).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

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


# Mountpoints every container needs; images often lack /etc/hosts and /etc/resolv.conf.
STUB_DIRS = ("proc", "dev", "sys", "etc")
STUB_FILES = ("etc/hosts", "etc/resolv.conf")


def stub_layer(scratch: str) -> None:
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


def run_mount(m: dict[str, Any], index: int, scratch: str, place: Mountpoints) -> None:
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
        secret = _read_memfd(m["data_fd"])
        size = max(4096, len(secret) + 4096)
        mount("tmpfs", holder, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"mode=755,size={size}")
        path = os.path.join(holder, "secret")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            view = memoryview(secret)
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


def mount_dev(dev: str, user_namespace: bool) -> None:
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


def mount_proc(proc: str, masked: bool) -> None:
    try:
        mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        # A docker container masks parts of its /proc, and the kernel then refuses a
        # fresh procfs in a user namespace: bind the one we see (it lists more
        # processes than the step's own, as BuildKit's no-process-sandbox mode does).
        mount("/proc", proc, None, MS_BIND | MS_REC)
    if masked:
        _mask_kernel_paths(proc, "proc/")


def mount_sys(sys_dir: str, insecure: bool) -> None:
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


class Mountpoints:
    """Finds (or creates, as stubs) mount targets inside the root without leaving it.

    Targets are resolved like a chroot would, so a symlink in the image (say an
    absolute /etc/resolv.conf link) cannot make us mount over, or create files on, a host
    path. Anything created is recorded so the server can remove it afterwards if the
    process left it untouched (BuildKit's MountStubsCleaner).
    """

    def __init__(self, root: str, upper: str | None, stubs: list[dict[str, Any]]) -> None:
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


def remove_stubs(spec: dict[str, Any], stubs: list[dict[str, Any]]) -> None:
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
            if os.listdir(path) or is_opaque(path):
                continue
            parent = os.path.dirname(path)
            parent_st = os.stat(parent)
            os.rmdir(path)
            os.utime(parent, ns=(parent_st.st_atime_ns, parent_st.st_mtime_ns))


def is_opaque(path: str) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        with contextlib.suppress(OSError):
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
    return False
