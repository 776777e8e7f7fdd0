"""The fallback executor for locked-down containers: chroot, no namespaces.

Where a default docker container forbids unshare and mount (seccomp, no CAP_SYS_ADMIN),
a plain chroot into a :class:`PlainRootfs` is still possible for root. There is no
sandbox: no /proc, /dev or /etc/hosts of its own, the host's network, PIDs and hostname,
and no RUN mounts. It shares the fork server and its protocol with the namespace executor.
"""

from __future__ import annotations

import os

from dockbuild.engine.executor import OutputSink, PlainRootfs, RunRequest
from dockbuild.engine.executor.namespace import ForkServerExecutor
from dockbuild.errors import ExecutorError


class ChrootExecutor(ForkServerExecutor):
    """fork, chroot, chdir, drop to USER, exec."""

    name = "chroot"
    sandbox = "chroot"

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
        if request.mounts:
            targets = ", ".join(m.target for m in request.mounts)
            raise ExecutorError(f"the chroot executor cannot mount anything ({targets})")
        return super().run(request, output)
