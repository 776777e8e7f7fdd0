"""Times dockbuild as whole processes: --version, a cold build and cached rebuilds.

    .venv/bin/python bench/startup_and_rebuild.py [--runs N]

Runs the installed console script (next to this interpreter) on examples/hello with the
local busybox image (testdata/images/busybox, made by `make setup`). Prints the median and
spread of each measurement. The cached rebuild runs on a pseudo-terminal, as a developer
types it: nothing to export, every step CACHED. Goals (issue #2): cached rebuild under
0.3 s, --version under 0.1 s; issue 16's no-op rebuild and cached OCI export goals are
measured by bench/noop_rebuild.py. The interpreter's own start is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import pty
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
HELLO = REPO / "examples" / "hello"
BASE = ["--build-context", f"busybox=oci-layout://{BUSYBOX}"]


def timed(args: list[str], env: dict[str, str], tty: bool = False) -> float:
    main = child = None
    if tty:
        main, child = pty.openpty()
    start = time.perf_counter()
    proc = subprocess.run(
        [DOCKBUILD, *args],
        env=env,
        stdout=child if tty else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    elapsed = time.perf_counter() - start
    if main is not None:
        os.close(main)
        os.close(child)  # type: ignore[arg-type]
    if proc.returncode != 0:
        sys.exit(f"dockbuild {' '.join(args)} failed:\n{proc.stderr.decode()}")
    return elapsed


def report(name: str, samples: list[float], goal: float | None = None) -> None:
    med = statistics.median(samples)
    verdict = "" if goal is None else f"  (goal < {goal:.2f} s: {'met' if med < goal else 'MISSED'})"
    print(f"{name:<42} median {med:6.3f} s   min {min(samples):6.3f}   max {max(samples):6.3f}{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if not (BUSYBOX / "index.json").exists():
        sys.exit(f"{BUSYBOX} is missing: run `make setup` first")
    with tempfile.TemporaryDirectory(prefix="dockbuild-bench-") as tmp:
        env = dict(os.environ, DOCKBUILD_ROOT=str(Path(tmp) / "cache"))
        version = [timed(["--version"], env) for _ in range(args.runs)]
        floor = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            floor.append(time.perf_counter() - start)
        cold = []
        for i in range(max(3, args.runs // 2)):
            root = Path(tmp) / f"cold{i}"
            cold.append(timed(["--progress=quiet", *BASE, str(HELLO)], dict(env, DOCKBUILD_ROOT=str(root)), tty=True))
            shutil.rmtree(root, ignore_errors=True)
        timed(["--progress=quiet", *BASE, str(HELLO)], env, tty=True)  # warm the cache
        cached = [timed(["--progress=quiet", *BASE, str(HELLO)], env, tty=True) for _ in range(args.runs)]
        oci = str(Path(tmp) / "hello.tar")
        cached_export = [
            timed(["--progress=quiet", *BASE, str(HELLO), "-o", f"type=oci,dest={oci}"], env)
            for _ in range(args.runs)
        ]
    print(f"dockbuild: {DOCKBUILD}  ({args.runs} runs, {os.cpu_count()} CPUs)")
    report("python -c pass (the interpreter's start)", floor)
    report("dockbuild --version", version, 0.1)
    report("cold build of examples/hello", cold)
    report("cached rebuild (terminal, no export)", cached, 0.3)
    report("cached rebuild + OCI tar export", cached_export)


if __name__ == "__main__":
    main()
