"""Rootless operation: a non-root dockbuild re-runs itself in a user namespace.

The whole build (unpacking layers, chown, overlay mounts, every RUN) happens inside
one user namespace where the user is root, as ``rootlesskit`` / ``buildah unshare``
do. With subuid/subgid ranges (``/etc/subuid``, ``/etc/subgid``)
``newuidmap``/``newgidmap`` map 0 to the user and 1..N to the range, so files owned by
1000 or 65534 inside the image keep those ids. Without ranges only the user's own id is
mapped (to 0): the build works, but a RUN cannot chown to other users; a warning says
how to add a range. Overlay mounts then use ``userxattr``.

This module is imported by the CLI before anything else runs (no threads yet), so it
may exec. It imports what only the rootless path needs (subprocess, shutil, pwd) there:
as root with CAP_SYS_ADMIN every build passes through here, and pays for nothing else.
"""

from __future__ import annotations

import os
import sys

CHILD_ENV = "DOCKBUILD_USERNS"  # set in the re-executed process: "subuid" | "single"
COMMANDS = ("build", "du", "prune")


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the host's."""
    try:
        with open("/proc/self/uid_map") as f:
            lines = f.read().split()
    except OSError:
        return False
    return lines != ["0", "0", "4294967295"]


def mode() -> str:
    """ "host" (real root), "subuid", "single" or "root" (in our user namespace), "none"."""
    if os.geteuid() == 0 and not in_user_namespace():
        return "host"
    return os.environ.get(CHILD_ENV, "none") if in_user_namespace() else "none"


def _ranges(path: str, uid: int, name: str) -> int:
    """How many subordinate ids ``/etc/subuid``-style ``path`` gives the user."""
    total = 0
    try:
        with open(path) as f:
            for line in f:
                owner, _, rest = line.strip().partition(":")
                start, _, count = rest.partition(":")
                if owner in (name, str(uid)) and start.isdigit() and count.isdigit():
                    total += int(count)
    except OSError:
        return 0
    return total


def plan() -> dict[str, object]:
    """How a non-root user's build would enter its user namespace (for debug info)."""
    import pwd
    import shutil

    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    unshare = shutil.which("unshare")
    subuids = _ranges("/etc/subuid", uid, name)
    subgids = _ranges("/etc/subgid", uid, name)
    helpers = bool(shutil.which("newuidmap") and shutil.which("newgidmap"))
    info: dict[str, object] = {"user": name, "subuids": subuids, "subgids": subgids}
    if unshare is None:
        info["error"] = "unshare (util-linux) is not installed"
        return info
    command = [unshare, "--user", "--map-root-user"]
    if subuids and subgids and helpers:
        info["map"] = "subuid"
        command.append("--map-auto")
    else:
        info["map"] = "single"
        if not helpers:
            why = "newuidmap/newgidmap (package uidmap) are not installed"
        else:
            why = f"user {name} has no range in /etc/subuid and /etc/subgid"
        info["warning"] = (
            f"rootless build with a single-ID mapping ({why}): RUN steps are root but "
            "cannot chown files to other users. Fix: "
            + (f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name}"
               if helpers else "apt-get install uidmap")
        )  # fmt: skip
    info["command"] = command
    return info


CAP_SYS_ADMIN = 21


def lacks_sys_admin() -> bool:
    """Root without CAP_SYS_ADMIN: a docker container's root, typically."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return not int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1
    except (OSError, ValueError):
        pass
    return False


def needed() -> bool:
    """Whether this command should run in a user namespace of its own."""
    if os.environ.get(CHILD_ENV) or in_user_namespace():
        return False
    return os.geteuid() != 0 or lacks_sys_admin()


def enter_as_root(ids: int = 65536) -> bool:
    """Root without CAP_SYS_ADMIN (a container started with seccomp=unconfined): move
    this process into a new user namespace mapping 0..ids-1 to the same ids.

    Root has CAP_SETUID and CAP_SETGID where it is, so it may write any map itself: a
    forked helper, still outside, writes ours once we have unshared. (newuidmap would
    look for root in /etc/subuid.) Only while single-threaded, before anything else.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(ready_w)
        os.close(done_r)
        ok = b"0"
        try:
            if os.read(ready_r, 1) == b"1":
                for name, text in (
                    ("setgroups", "allow"),
                    ("uid_map", f"0 0 {ids}\n"),
                    ("gid_map", f"0 0 {ids}\n"),
                ):
                    with open(f"/proc/{parent}/{name}", "w") as f:
                        f.write(text)
                ok = b"1"
        except OSError:
            pass
        finally:
            os.write(done_w, ok)
            os._exit(0)
    os.close(ready_r)
    os.close(done_w)
    try:
        entered = libc.unshare(0x10000000) == 0  # CLONE_NEWUSER
        os.write(ready_w, b"1" if entered else b"0")
        mapped = os.read(done_r, 1) == b"1"
    finally:
        os.close(ready_w)
        os.close(done_r)
        os.waitpid(pid, 0)
    if entered and mapped:
        os.environ[CHILD_ENV] = "root"
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    return entered and mapped


def reexec(argv: list[str]) -> None:
    """Run ``dockbuild argv`` again inside a user namespace, if this is needed and possible.

    Does nothing as real root, inside our namespace already, for commands that need no
    privileges, or when user namespaces are refused here (the executor probe reports
    that later, with the flags that fix it).
    """
    if not argv or argv[0] not in COMMANDS:
        return
    if "-h" in argv or "--help" in argv:
        return
    reexec_module("dockbuild", argv)


def reexec_module(module: str, argv: list[str]) -> None:
    """Run ``python -m module argv`` again inside a user namespace, if this is needed and
    possible (the kaniko and buildctl front ends re-run themselves this way)."""
    if not needed():
        return
    if os.geteuid() == 0:
        enter_as_root()  # if refused, the executor probe explains (chroot or an error)
        return
    import subprocess

    info = plan()
    command = info.get("command")
    if not isinstance(command, list):
        return
    # A failed unshare (seccomp, sysctl) would end the build with an unclear message.
    probe = subprocess.run([*command, "true"], capture_output=True, check=False)
    if probe.returncode != 0 and info.get("map") == "subuid":
        command = command[:-1]  # newuidmap refused (e.g. in a container): one id only
        info["map"] = "single"
        info["warning"] = (
            "newuidmap/newgidmap could not map the subordinate ids "
            f"({probe.stderr.decode(errors='replace').strip()}): rootless build with a "
            "single-ID mapping, RUN steps cannot chown files to other users"
        )
        probe = subprocess.run([*command, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return
    if "warning" in info:
        print(f"WARNING: {info['warning']}", file=sys.stderr)
    env = dict(os.environ, **{CHILD_ENV: str(info["map"])})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], [*command, "--", sys.executable, "-m", module, *argv], env)
