"""Parallel solving: four independent stages of about 2 s of CPU work each, on this
machine's cores, through the real CLI. Goal on 2 cores: wall time close to 2 x 2 s
(two at a time), not 4 x 2 s.

Run as root: ``.venv/bin/python bench/parallel_stages.py [--seconds 2]``. The loop count
that costs the requested CPU time is calibrated first with a one-stage build; every
build uses ``--no-cache``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKBUILD = str(Path(sys.executable).with_name("dockbuild"))


def dockerfile(loops: int, stages: int) -> str:
    work = f'RUN i=0; while [ $i -lt {loops} ]; do i=$((i+1)); done; echo $i > /out'
    text = "".join(f"FROM busybox AS s{n}\n{work}-{n}\n" for n in range(stages))
    text += "FROM busybox\n" + "".join(f"COPY --from=s{n} /out-{n} /\n" for n in range(stages))
    return text


def build(ctx: Path, text: str, env: dict[str, str]) -> tuple[float, float]:
    """Wall time, and CPU time of the dockbuild process and what it waited for."""
    (ctx / "Dockerfile").write_text(text)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [DOCKBUILD, "--progress=quiet", "--no-cache", "--build-context",
         f"busybox=oci-layout://{REPO / 'testdata/images/busybox'}",
         "-o", f"type=local,dest={ctx.parent / 'out'}", str(ctx)],
        env=env, check=True, stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dockbuild-bench-") as tmp:
        ctx = Path(tmp) / "ctx"
        ctx.mkdir()
        env = dict(os.environ, DOCKBUILD_ROOT=str(Path(tmp) / "cache"))
        probe = 200000
        wall, _ = build(ctx, dockerfile(probe, 1), env)
        base, _ = build(ctx, dockerfile(10, 1), env)  # fixed cost of a one-stage build
        loops = int(probe * options.seconds / max(wall - base, 0.05))
        one, cpu1 = build(ctx, dockerfile(loops, 1), env)
        four, cpu4 = build(ctx, dockerfile(loops, 4), env)
        print(f"cores: {os.cpu_count()}, loop count {loops} (~{options.seconds:.1f} s of CPU per stage)")
        print(f"one stage:    wall {one:6.2f} s  (CPU {cpu1:6.2f} s)")
        print(f"four stages:  wall {four:6.2f} s  (CPU {cpu4:6.2f} s)")
        print(f"serial would be about {4 * (one - base) + base:6.2f} s; "
              f"ideal on {os.cpu_count()} cores about {4 * (one - base) / (os.cpu_count() or 1) + base:6.2f} s")


if __name__ == "__main__":
    main()
