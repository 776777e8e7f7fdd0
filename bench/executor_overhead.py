"""Per-RUN overhead of the namespace executor: /bin/true 50 times on a busybox overlay.

Run as root: ``.venv/bin/python bench/executor_overhead.py [runs] [--network none]``.
The fork server's start (once per build) is measured separately from the runs. Runs
follow each other without a pause, so the fork server's spare PID 1 (forked while the
engine does a step's bookkeeping) has no head start here: this is the executor's cost,
not its latency within a build (bench/run_overhead.py measures that). CPU time per run
is printed too: this process's, and the fork server's with its containers'.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from dockbuild.engine.executor import OverlayRootfs, RunRequest
from dockbuild.engine.executor.namespace import NamespaceExecutor


def make_lower(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "true"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    for d in ("proc", "dev", "sys"):  # as in a real image: no stubs to create
        (root / d).mkdir()
    for f in ("hosts", "resolv.conf"):
        (root / "etc" / f).touch()
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=int, nargs="?", default=50)
    parser.add_argument("--network", default="default", choices=("default", "none", "host"))
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dockbuild-bench-") as tmp:
        base = Path(tmp)
        lower = make_lower(base / "lower")
        executor = NamespaceExecutor()
        self_cpu = children_cpu = 0.0
        try:
            times = []
            for i in range(options.runs + 1):
                upper, work = base / f"u{i}", base / f"w{i}"
                upper.mkdir()
                work.mkdir()
                request = RunRequest(
                    args=("/bin/true",),
                    env=("PATH=/bin",),
                    cwd="/",
                    rootfs=OverlayRootfs((str(lower),), str(upper), str(work)),
                    network=options.network,
                )
                if i == 1:  # CPU time from the second run: the server has started
                    self_cpu = _cpu(resource.RUSAGE_SELF)
                    children_cpu = _cpu(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                status = executor.run(request, lambda _stream, _data: None)
                times.append((time.perf_counter() - start) * 1000)
                if status != 0:
                    raise SystemExit(f"/bin/true exited {status}")
            self_cpu = _cpu(resource.RUSAGE_SELF) - self_cpu
        finally:
            executor.close()  # waits for the server: its CPU time (and its children's) counts
        children_cpu = _cpu(resource.RUSAGE_CHILDREN) - children_cpu
    first, rest = times[0], times[1:]
    print(f"first run (includes starting the fork server): {first:.1f} ms")
    print(
        f"{len(rest)} runs of /bin/true, network={options.network}: "
        f"mean {statistics.mean(rest):.2f} ms, median {statistics.median(rest):.2f} ms, "
        f"min {min(rest):.2f} ms, max {max(rest):.2f} ms"
    )
    print(
        f"CPU per run: engine {self_cpu / len(rest) * 1000:.2f} ms, fork server (its start "
        f"included) and containers "
        f"{children_cpu / len(rest) * 1000:.2f} ms (load average {os.getloadavg()[0]:.1f})"
    )


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
