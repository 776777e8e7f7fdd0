"""What QEMU user-mode emulation costs a RUN step: the same steps built for linux/amd64
(native) and linux/arm64 (emulated through binfmt_misc), through the real CLI.

    .venv/bin/python bench/emulation.py [--rounds 3] [--platform linux/arm64]

The base is testdata/images/busybox-multi (make setup). Each workload is one RUN, built
with --no-cache in a warm cache root (the base unpacked already); its cost is the build's
wall time minus that of a `RUN true` build of the same platform, so start-up and export
cancel out. `RUN true` itself, emulated minus native, is the per-step cost of starting
QEMU. Rounds interleave the platforms, so a load that comes and goes hits both alike;
medians are printed. The workloads stand in for a compile (no arm64 C compiler is in
the image): busybox's sha256sum over 16 MB (compiled code, QEMU's translation at its
best), a 20,000-iteration shell loop (busybox ash: branches and small calls) and 200
executions of /bin/true (each starts a QEMU: what configure scripts and make pay).
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
MULTI = REPO / "testdata" / "images" / "busybox-multi"
WORKLOADS = {
    "true": "true",
    "sha256sum 16 MB": "head -c 16000000 /dev/zero | sha256sum > /sum",
    "shell loop 20k": "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo $i > /count",
    "200 execs": "for i in $(seq 200); do /bin/true; done",
}


def build(context: Path, platform: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [DOCKBUILD, "build", "--no-cache", "--progress=plain", "--platform", platform,
         "--build-context", f"busybox=oci-layout://{MULTI}", "-o", "type=tar,dest=/dev/null",
         str(context)],
        env=env, capture_output=True, check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"build for {platform} failed:\n{done.stderr.decode(errors='replace')}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--platform", default="linux/arm64", help="the emulated platform")
    options = parser.parse_args()
    if not (MULTI / "index.json").exists():
        sys.exit(f"{MULTI} is missing: run make setup")
    platforms = ("linux/amd64", options.platform)
    base = Path(tempfile.mkdtemp(prefix="dockbuild-bench-"))
    try:
        env = dict(os.environ, DOCKBUILD_ROOT=str(base / "cache"))
        contexts = {}
        for n, (name, command) in enumerate(WORKLOADS.items()):
            ctx = base / f"ctx{n}"
            ctx.mkdir()
            (ctx / "Dockerfile").write_text(f"FROM busybox\nRUN {command}\n")
            contexts[name] = ctx
        for platform in platforms:  # warm: the base of each platform unpacked once
            build(contexts["true"], platform, env)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(options.rounds):
            for name, ctx in contexts.items():
                for platform in platforms:
                    times.setdefault((name, platform), []).append(build(ctx, platform, env))
        median = {key: statistics.median(values) for key, values in times.items()}
        print(f"{options.rounds} rounds, medians; load average {os.getloadavg()[0]:.2f}")
        native, emulated = platforms
        start_cost = median[("true", emulated)] - median[("true", native)]
        print(f"  RUN true build: native {median[('true', native)]:.3f} s, "
              f"emulated {median[('true', emulated)]:.3f} s: {start_cost * 1000:+.0f} ms per emulated step")  # fmt: skip
        for name in WORKLOADS:
            if name == "true":
                continue
            cost = {p: median[(name, p)] - median[("true", p)] for p in platforms}
            ratio = cost[emulated] / cost[native] if cost[native] > 0 else float("inf")
            print(f"  {name}: native {cost[native]:.3f} s, {emulated} {cost[emulated]:.3f} s "
                  f"({ratio:.1f}x)")  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
