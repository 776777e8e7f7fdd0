"""The fallback executor for locked-down containers: chroot, no namespaces.

Where a default docker container forbids unshare and mount (seccomp, no CAP_SYS_ADMIN),
a plain chroot into a :class:`PlainRootfs` is still possible for root. There is no
sandbox: no /proc, /dev or /etc/hosts of its own, the host's network, PIDs and hostname
(BUILDKIT_SANDBOX_HOSTNAME cannot apply: setting it needs a UTS namespace). RUN mounts
are emulated with copies (:mod:`.copied_mounts`). What keeps a step from the host: the
chroot, no descriptor but its own, CAP_SYS_CHROOT, CAP_SYS_PTRACE and CAP_SYS_ADMIN out
of its bounding set, no_new_privs, and dockbuild's own processes non-dumpable (see
``forkserver.container``). It shares the fork server and its protocol with the namespace
executor.
"""

from __future__ import annotations

import dataclasses
import os

from dockbuild.engine.executor import OutputSink, PlainRootfs, RunRequest
from dockbuild.engine.executor.namespace import ForkServerExecutor
from dockbuild.errors import ExecutorError


class ChrootExecutor(ForkServerExecutor):
    """fork, chroot, chdir, drop to USER, exec."""

    name = "chroot"
    sandbox = "chroot"
    mounts = False

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise ExecutorError("the chroot executor needs root (CAP_SYS_CHROOT)")
        from dockbuild.engine.executor.forkserver.syscalls import set_dumpable

        # A step runs as root beside us: it must not ptrace this process or read its
        # memory (/proc/PID/mem, environ). The fork server does the same for itself.
        set_dumpable(False)
        super().__init__()

    def run(self, request: RunRequest, output: OutputSink) -> int:
        if not isinstance(request.rootfs, PlainRootfs):
            raise ExecutorError(
                "the chroot executor needs a plain directory rootfs (no overlay mounts)",
                hint="use the copy snapshotter with --executor chroot",
            )
        if request.extra_hosts or request.shm_size:
            flag = "--add-host" if request.extra_hosts else "--shm-size"
            raise ExecutorError(
                f"{flag} cannot work with the chroot executor: RUN steps there see the "
                "host's own /etc/hosts and /dev/shm (it makes no mounts)",
                hint="use the namespace or runc executor",
            )
        if not request.mounts:
            return super().run(request, output)
        from dockbuild.engine.executor.copied_mounts import CopiedMounts

        copied = CopiedMounts(request.rootfs.path, request.mounts)
        try:
            copied.place()
            return super().run(dataclasses.replace(request, mounts=()), output)
        finally:
            # Before the snapshotter compares the rootfs with its parent.
            copied.remove()
