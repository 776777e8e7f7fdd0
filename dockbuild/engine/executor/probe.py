"""Choosing an executor: by name, or by probing what this host allows (not by distro)."""

from __future__ import annotations

import functools
import logging
import os
import subprocess

from dockbuild.engine.executor import Executor
from dockbuild.errors import ExecutorError

NAMES = ("namespace", "chroot", "runc")
LOCKED_DOWN_HINT = (
    "in a docker container, run with --security-opt seccomp=unconfined "
    "--security-opt apparmor=unconfined (or --privileged) for sandboxed RUN steps"
)
log = logging.getLogger(__name__)


# A namespace executor whose fork server's probe said yes: the build's executor, so its
# server (started for the probe) is not started a second time.
_PROBED: list[Executor] = []


@functools.cache
def _probe_namespaces() -> tuple[bool, str]:
    """Try what a RUN needs (unshare, private mounts, /proc) where RUNs would run: the
    namespace executor's fork server probes as it starts, in its own process (the caller
    may be multi-threaded). Cached: the answer does not change while dockbuild runs.
    """
    from dockbuild.engine.executor.namespace import NamespaceExecutor

    if os.geteuid() != 0:
        return False, "not root and not in a user namespace"
    executor = NamespaceExecutor()
    try:
        executor.start()
    except ExecutorError as e:
        executor.close()
        return False, f"the namespace probe failed: {e.message}"
    answer = executor.probe or {"namespaces": False, "reason": "the fork server gave no answer"}
    if not answer["namespaces"]:
        executor.close()
        return False, f"namespaces are not available: {answer['reason']}"
    _PROBED.append(executor)
    if answer.get("proc") == "bind":
        return True, (
            "unshare(mount|pid|ipc|uts) works; /proc is masked (a container), so RUN "
            "steps see a bind of it instead of a fresh one"
        )
    return True, "root, and unshare(mount|pid|ipc|uts) with a fresh /proc works"


def describe(name: str | None = None) -> dict[str, object]:
    """What :func:`get_executor` chooses for ``name`` and why (for ``dockbuild debug info``)."""
    requested = name or os.environ.get("DOCKBUILD_EXECUTOR") or "auto"
    info: dict[str, object] = {"requested": requested, "euid": os.geteuid()}
    if requested != "auto":
        info["executor"] = requested
        info["reason"] = "chosen explicitly"
        if requested not in NAMES:
            info["error"] = f"unknown executor {requested!r}"
        elif requested == "runc":
            import shutil

            info["runc"] = shutil.which("runc")
        return info
    from dockbuild import userns as rootless

    mode = rootless.mode()
    if os.geteuid() != 0:
        # The dockbuild command re-runs a build in a user namespace (rootless.reexec).
        plan = rootless.plan()
        info["rootless"] = plan
        command = plan.get("command")
        refused = ""
        if isinstance(command, list):
            done = subprocess.run([*command[:3], "true"], capture_output=True, check=False)
            if done.returncode != 0:
                refused = done.stderr.decode(errors="replace").strip() or "unshare failed"
        if "error" in plan or refused:
            reason = str(plan.get("error") or f"user namespaces are refused here ({refused})")
            info.update(executor=None, reason=reason, error="no way to run RUN steps here")
        else:
            info.update(
                executor="namespace",
                reason=f"not root: builds run in a user namespace ({plan['map']} id mapping, "
                "overlay with userxattr)",
            )
            if "warning" in plan:
                info["warning"] = plan["warning"]
        return info
    if os.geteuid() == 0 and rootless.lacks_sys_admin() and not rootless.in_user_namespace():
        # Container root without CAP_SYS_ADMIN: `dockbuild build` enters a user namespace
        # of its own first (rootless.enter_as_root) when seccomp lets it.
        import shutil

        unshare = shutil.which("unshare")
        if unshare and subprocess.run([unshare, "--user", "true"], capture_output=True).returncode == 0:
            info["rootless"] = {"map": "root"}
            info.update(
                executor="namespace",
                reason="root without CAP_SYS_ADMIN (a container): builds run in a user "
                "namespace of their own, ids 0-65535 mapped to themselves",
            )
            return info
    works, reason = _probe_namespaces()
    info["namespaces"] = works
    if mode in ("subuid", "single", "root"):
        info["rootless"] = {"map": mode}
        reason = f"in dockbuild's user namespace ({mode} id mapping, overlay with userxattr): {reason}"
    elif os.geteuid() == 0 and rootless.lacks_sys_admin() and not rootless.in_user_namespace():
        reason += (
            "; root without CAP_SYS_ADMIN: `dockbuild build` enters a user namespace of its "
            "own when seccomp allows it (docker: --security-opt seccomp=unconfined)"
        )
    if works:
        info.update(executor="namespace", reason=reason)
    elif os.geteuid() == 0:
        info.update(
            executor="chroot",
            reason=reason,
            warning="RUN steps run in a bare chroot without any sandbox: " + LOCKED_DOWN_HINT,
        )
    else:
        info.update(executor=None, reason=reason, error="no way to run RUN steps here")
    return info


def get_executor(name: str | None = None) -> Executor:
    """The executor called ``name`` ("namespace", "chroot", "runc"), or the best one here.

    ``None`` or "auto" (also from $DOCKBUILD_EXECUTOR) probes: namespaces when they work,
    else chroot with a warning, else an error naming the container flags that fix it.
    """
    from dockbuild.engine.executor.chroot import ChrootExecutor
    from dockbuild.engine.executor.namespace import NamespaceExecutor

    info = describe(name)
    chosen = info.get("executor")
    _reset_reserved_signals()
    if "error" in info:
        if chosen is None:
            raise ExecutorError(f"{info['error']}: {info['reason']}", hint=LOCKED_DOWN_HINT)
        raise ExecutorError(str(info["error"]), hint=f"choose one of {', '.join(NAMES)}")
    if "warning" in info:
        log.warning("WARNING: %s", info["warning"])
    if chosen == "namespace":
        return _PROBED.pop() if _PROBED else NamespaceExecutor()
    if chosen == "chroot":
        executor = ChrootExecutor()
        executor.warning = str(info["warning"]) if "warning" in info else None
        return executor
    from dockbuild.engine.executor.runc import RuncExecutor

    return RuncExecutor()


# rt_sigaction's number, where dockbuild runs; signals 32 and 33 are glibc's own
# (thread cancellation, setxid), which libc's sigaction() and Python refuse to touch.
_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}


def _reset_reserved_signals() -> None:
    """Give signals 32 and 33 back their default action if whoever started dockbuild
    left them ignored (GNU make does): an ignored signal survives exec, so every RUN
    (and runc) would inherit it. Only an inherited SIG_IGN is changed."""
    import ctypes

    number = _RT_SIGACTION.get(os.uname().machine)
    if number is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for sig in (32, 33):
        old = (ctypes.c_ulong * 4)()  # handler, flags, restorer, mask
        if libc.syscall(number, sig, None, old, 8) == 0 and old[0] == 1:  # SIG_IGN
            default = (ctypes.c_ulong * 4)()  # SIG_DFL, no flags, empty mask
            libc.syscall(number, sig, default, None, 8)
