"""The fallback executor for locked-down containers: chroot, no namespaces.

Where a default docker container forbids unshare and mount (seccomp, no CAP_SYS_ADMIN),
a plain chroot into a :class:`PlainRootfs` is still possible for root. There is no
sandbox: no /proc, /dev or /etc/hosts of its own, the host's network, PIDs and hostname
(BUILDKIT_SANDBOX_HOSTNAME cannot apply: setting it needs a UTS namespace), and no RUN
mounts (mount(2) is what such a container forbids). It shares the fork server and its protocol with the namespace executor.
"""

from __future__ import annotations

import os

from dockbuild.engine.executor import LOCKED_DOWN_HINT, OutputSink, PlainRootfs, RunRequest
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
        if request.mounts:
            targets = ", ".join(m.target for m in request.mounts)
            if self.warning is not None:  # chosen because nothing else works here
                raise ExecutorError(
                    f"RUN --mount ({targets}) cannot work here: this environment forbids "
                    "mount(2) (no CAP_SYS_ADMIN, seccomp: a default docker container), "
                    "so RUN steps fall back to a bare chroot, which cannot mount anything",
                    hint=LOCKED_DOWN_HINT,
                )
            raise ExecutorError(
                f"RUN --mount ({targets}) needs mounts, and the chroot executor makes none",
                hint="use the namespace or runc executor",
            )
        return super().run(request, output)
