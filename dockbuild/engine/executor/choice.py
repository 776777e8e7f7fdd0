"""Choosing an executor: by name, or by probing what this host allows (not by distro)."""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dockbuild.engine.executor import LOCKED_DOWN_HINT, NON_ROOT_HINT, Executor
from dockbuild.errors import ExecutorError

NAMES = ("namespace", "chroot", "runc")


@dataclass(frozen=True)
class RootlessPlan:
    """How builds enter their user namespace (``dockbuild.userns``)."""

    map: str | None  # "subuid" | "single" | "root" (ids 0-65535 as themselves); None: cannot
    user: str | None = None  # the user and their subordinate id counts, when not root
    subuids: int | None = None
    subgids: int | None = None
    command: tuple[str, ...] = ()  # the unshare command line that enters it
    warning: str | None = None
    error: str | None = None

    @classmethod
    def from_userns(cls, plan: Mapping[str, object]) -> RootlessPlan:
        """From :func:`dockbuild.userns.plan`'s answer."""
        command = plan.get("command")

        def text(key: str) -> str | None:
            value = plan.get(key)
            return None if value is None else str(value)

        def count(key: str) -> int | None:
            value = plan.get(key)
            return value if isinstance(value, int) else None

        return cls(
            map=text("map"), user=text("user"), subuids=count("subuids"), subgids=count("subgids"),
            command=tuple(str(c) for c in command) if isinstance(command, list) else (),
            warning=text("warning"), error=text("error"),
        )  # fmt: skip

    def info(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.user is not None:
            out.update(user=self.user, subuids=self.subuids, subgids=self.subgids)
        if self.error is not None:
            out["error"] = self.error
            return out
        out["map"] = self.map
        if self.warning is not None:
            out["warning"] = self.warning
        if self.command:
            out["command"] = list(self.command)
        return out


@dataclass(frozen=True)
class ExecutorChoice:
    """Which executor runs RUN steps here, why, and what it can do (``dockbuild debug info``)."""

    requested: str  # "auto" or the name asked for (--executor, $DOCKBUILD_EXECUTOR)
    euid: int
    name: str | None  # None: nothing can run RUN steps here (``error`` says so)
    reason: str
    # Whether the executor can mount (an overlay rootfs, RUN --mount): if not, steps
    # get the copy snapshotter.
    mounts: bool = False
    warning: str | None = None  # a fallback the user should hear about
    error: str | None = None
    namespaces: bool | None = None  # what the namespace probe found, when it ran
    rootless: RootlessPlan | None = None  # how builds enter their user namespace
    runc: str | None = None  # the runc binary, when runc was asked for

    def info(self, root: Path | None = None) -> dict[str, object]:
        """As JSON for ``dockbuild debug info``; with the snapshotter for the cache root
        ``root`` (probed there when this process is where builds run)."""
        out: dict[str, object] = {"requested": self.requested, "euid": self.euid}
        if self.rootless is not None:
            out["rootless"] = self.rootless.info()
        if self.namespaces is not None:
            out["namespaces"] = self.namespaces
        out.update(executor=self.name, reason=self.reason, mounts=self.mounts)
        if self.name is not None and root is not None:
            from dockbuild.engine.snapshotter.probe import verdict

            try:
                root.mkdir(parents=True, exist_ok=True)
                # A rootless plan: builds run in a user namespace, so the probe does too.
                found = verdict(root, self.mounts, enter_userns=self.rootless is not None)
                out.update(snapshotter=found.name, snapshotter_reason=found.reason)
            except OSError as e:
                out.update(snapshotter=None, snapshotter_reason=f"cache root unusable: {e}")
        if self.requested == "runc":
            out["runc"] = self.runc
        for key, value in (("warning", self.warning), ("error", self.error)):
            if value is not None:
                out[key] = value
        return out


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


def choose(name: str | None = None) -> ExecutorChoice:
    """What :func:`get_executor` chooses for ``name`` and why."""
    requested = name or os.environ.get("DOCKBUILD_EXECUTOR") or "auto"
    euid = os.geteuid()
    if requested != "auto":
        runc = None
        if requested == "runc":
            import shutil

            runc = shutil.which("runc")
        return ExecutorChoice(
            requested, euid, requested, "chosen explicitly",
            mounts=requested in ("namespace", "runc"),
            error=None if requested in NAMES else f"unknown executor {requested!r}",
            runc=runc,
        )  # fmt: skip
    from dockbuild import userns as rootless

    mode = rootless.mode()
    if euid != 0:
        # The dockbuild command re-runs a build in a user namespace (rootless.reexec).
        plan = RootlessPlan.from_userns(rootless.plan())
        refused = ""
        if plan.command:
            done = subprocess.run([*plan.command[:3], "true"], capture_output=True, check=False)
            if done.returncode != 0:
                refused = done.stderr.decode(errors="replace").strip() or "unshare failed"
        if plan.error is not None or refused:
            reason = plan.error or f"user namespaces are refused here ({refused})"
            return ExecutorChoice(
                requested, euid, None, reason, error="no way to run RUN steps here", rootless=plan
            )
        return ExecutorChoice(
            requested, euid, "namespace",
            f"not root: builds run in a user namespace ({plan.map} id mapping, "
            "overlay with userxattr)",
            mounts=True,
            warning=plan.warning,
            rootless=plan,
        )  # fmt: skip
    if rootless.lacks_sys_admin() and not rootless.in_user_namespace():
        # Container root without CAP_SYS_ADMIN: `dockbuild build` enters a user namespace
        # of its own first (rootless.enter_as_root) when seccomp lets it.
        import shutil

        unshare = shutil.which("unshare")
        if unshare and subprocess.run([unshare, "--user", "true"], capture_output=True).returncode == 0:
            return ExecutorChoice(
                requested, euid, "namespace",
                "root without CAP_SYS_ADMIN (a container): builds run in a user "
                "namespace of their own, ids 0-65535 mapped to themselves",
                mounts=True,
                rootless=RootlessPlan("root"),
            )  # fmt: skip
    works, reason = _probe_namespaces()
    plan_map: RootlessPlan | None = None
    if mode in ("subuid", "single", "root"):
        plan_map = RootlessPlan(mode)
        reason = f"in dockbuild's user namespace ({mode} id mapping, overlay with userxattr): {reason}"
    elif rootless.lacks_sys_admin() and not rootless.in_user_namespace():
        reason += (
            "; root without CAP_SYS_ADMIN: `dockbuild build` enters a user namespace of its "
            "own when seccomp allows it (docker: --security-opt seccomp=unconfined)"
        )
    if works:
        return ExecutorChoice(
            requested, euid, "namespace", reason, mounts=True, namespaces=True, rootless=plan_map
        )
    return ExecutorChoice(
        requested, euid, "chroot", reason,
        warning="RUN steps run in a bare chroot without any sandbox: " + LOCKED_DOWN_HINT,
        namespaces=False,
        rootless=plan_map,
    )  # fmt: skip


def get_executor(name: str | None = None) -> Executor:
    """The executor called ``name`` ("namespace", "chroot", "runc"), or the best one here.

    ``None`` or "auto" (also from $DOCKBUILD_EXECUTOR) probes: namespaces when they work,
    else chroot with a warning (the executor's ``warning``, which the solver reports),
    else an error naming the container flags that fix it.
    """
    from dockbuild.engine.executor.chroot import ChrootExecutor
    from dockbuild.engine.executor.namespace import NamespaceExecutor

    choice = choose(name)
    _reset_reserved_signals()
    if choice.error is not None:
        if choice.name is None:
            raise ExecutorError(f"{choice.error}: {choice.reason}", hint=NON_ROOT_HINT)
        raise ExecutorError(choice.error, hint=f"choose one of {', '.join(NAMES)}")
    executor: Executor
    if choice.name == "namespace":
        executor = _PROBED.pop() if _PROBED else NamespaceExecutor()
    elif choice.name == "chroot":
        executor = ChrootExecutor()
    else:
        from dockbuild.engine.executor.runc import RuncExecutor

        executor = RuncExecutor()
    from dockbuild.engine.network import fallback_warning

    warnings = [w for w in (choice.warning, fallback_warning(executor.name)) if w]
    executor.warning = "; ".join(warnings) or None
    return executor


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
