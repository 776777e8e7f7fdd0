"""A chroot-mode rebuild against the namespace executor's, on a Debian-sized base.

    .venv/bin/python bench/chroot_rebuild.py [--files 10000] [--size 12000] [--rounds 3]

The base stage is busybox plus a COPY of a generated tree (``--files`` files of
``--size`` bytes: ~120 MB, ~10k files by default, about a Debian image). On it, a
lab-like workload of 5 RUN steps (write, append, delete a directory, rewrite a file,
list) that depend on a build argument. Per executor, with its own cache root: one build
warms the cache, then each round (the executors interleaved) changes the argument, so
the base is cached and the 5 RUN steps run again (in chroot mode on the working rootfs
the last build kept, taken back to the base). Printed: the median rebuild per executor
and chroot / namespace (the goal: at most 1.5).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKBUILD = str(Path(sys.executable).with_name("dockbuild"))
BUSYBOX = REPO / "testdata" / "images" / "busybox"

DOCKERFILE = """\
FROM busybox AS base
COPY tree/ /usr/share/tree/
FROM base
ARG N
RUN echo $N > /etc/step1 && mkdir -p /opt/app && cp -r /usr/share/tree/d0 /opt/app/
RUN for i in 1 2 3; do echo $i$N >> /opt/app/log; done
RUN rm -rf /usr/share/tree/d1
RUN echo $N > /usr/share/tree/d2/f0
RUN ls -R /opt | wc -l > /count
"""


def build(root: Path, ctx: Path, executor: str, n: int) -> float:
    cmd = [
        DOCKBUILD, "build", "--progress=plain", "--executor", executor,
        "--build-context", f"busybox=oci-layout://{BUSYBOX}",
        "--build-arg", f"N={n}", "-o", f"type=tar,dest={root / 'out.tar'}", str(ctx),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(
        cmd, env=dict(os.environ, DOCKBUILD_ROOT=str(root)), capture_output=True, check=False
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr.decode(errors='replace')}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=12_000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the chroot executor needs root")
    base = Path(tempfile.mkdtemp(prefix="dockbuild-bench-"))
    try:
        ctx = base / "ctx"
        (ctx / "tree").mkdir(parents=True)
        (ctx / "Dockerfile").write_text(DOCKERFILE)
        per_dir = 100
        for i in range(options.files):
            d = ctx / "tree" / f"d{i // per_dir}"
            if i % per_dir == 0:
                d.mkdir()
            (d / f"f{i % per_dir}").write_bytes(os.urandom(options.size))
        executors = ("namespace", "chroot")
        times: dict[str, list[float]] = {e: [] for e in executors}
        for executor in executors:
            build(base / executor, ctx, executor, 0)
        # Interleaved: a machine loaded by others slows both alike.
        for n in range(1, options.rounds + 1):
            for executor in executors:
                times[executor].append(build(base / executor, ctx, executor, n))
        medians = {}
        for executor in executors:
            medians[executor] = statistics.median(times[executor])
            rounds = ", ".join(f"{t:.2f}" for t in times[executor])
            print(f"{executor:10} rebuild {medians[executor]:.2f}s  ({rounds})")
        print(f"chroot / namespace: {medians['chroot'] / medians['namespace']:.2f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
