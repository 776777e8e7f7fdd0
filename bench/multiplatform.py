"""A two-platform cross-compile build against the same build for one platform.

The workload: a "compile" stage on ``$BUILDPLATFORM`` (busybox; its RUN steps write a
few MB per ``TARGETARCH``), a target-independent tools stage (shared by both platforms,
built once), and a ``scratch`` stage per platform that copies the results in. No RUN
runs in a target platform's stage, so nothing is emulated. Each build starts from an
empty cache and writes an OCI tarball (an image index for two platforms).

Goal (issue 18): the two-platform build (linux/amd64 + linux/arm64) in at most 1.3x the
time of the linux/amd64 build alone. The two builds run interleaved within each run, so
a busy machine slows both alike; the load average is printed before and after.

Run after ``.venv/bin/python -m compileall -q dockbuild`` (start-up is not measured
compiling): ``env -u PYTHONDONTWRITEBYTECODE .venv/bin/python bench/multiplatform.py
[--runs 5]``. Needs the busybox layout (``make testdata``).
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
FROM --platform=$BUILDPLATFORM busybox AS tools
RUN mkdir /tools && for i in $(seq 1 20); do dd if=/dev/urandom of=/tools/t$i bs=1k count=100 2>/dev/null; done

FROM --platform=$BUILDPLATFORM busybox AS build
ARG TARGETARCH
COPY src/ /src/
RUN mkdir /out && for i in $(seq 1 30); do cat /src/*.c | sed "s/ARCH/$TARGETARCH/" > /out/obj$i.o; done
RUN cd /out && tar -cf /app-$TARGETARCH.tar obj*.o && for i in $(seq 1 20); do dd if=/dev/urandom of=/out/blob$i bs=1k count=100 2>/dev/null; done

FROM scratch
ARG TARGETARCH
COPY --from=tools /tools /tools
COPY --from=build /app-$TARGETARCH.tar /app.tar
COPY --from=build /out/blob1 /blob
"""


def context(root: Path) -> Path:
    ctx = root / "ctx"
    (ctx / "src").mkdir(parents=True)
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    for i in range(40):
        (ctx / "src" / f"f{i}.c").write_text(f"int f{i}(void) {{ return ARCH; }}\n" * 200)
    return ctx


def build(ctx: Path, cache: Path, out: Path, platform: str) -> float:
    env = dict(os.environ, DOCKBUILD_ROOT=str(cache))
    cmd = [
        DOCKBUILD, "build", "-q", "--build-context", f"busybox=oci-layout://{BUSYBOX}",
        "--platform", platform, "-o", f"type=oci,dest={out}", str(ctx),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    single: list[float] = []
    double: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-multiplatform-") as tmp:
        root = Path(tmp)
        ctx = context(root)
        for run in range(args.runs):
            for platform, times in (("linux/amd64", single), ("linux/amd64,linux/arm64", double)):
                cache = root / f"cache-{run}-{len(times)}-{platform.count(',')}"
                times.append(build(ctx, cache, root / "out.tar", platform))
                shutil.rmtree(cache, ignore_errors=True)
    one, two = statistics.median(single), statistics.median(double)
    print(f"linux/amd64 alone:          median {one:.2f} s  ({', '.join(f'{t:.2f}' for t in single)})")
    print(f"linux/amd64 + linux/arm64:  median {two:.2f} s  ({', '.join(f'{t:.2f}' for t in double)})")
    print(f"ratio: {two / one:.2f}x (goal: at most 1.3x)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
