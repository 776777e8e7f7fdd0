"""Per-RUN overhead through the real CLI: a Dockerfile of 50 ``RUN true`` steps, cold.

    .venv/bin/python bench/run_overhead.py [--steps 50] [--rounds 3] [--executor namespace]
                                           [--user NAME] [--networks default,none]

Each round uses a fresh cache root: a first build of ``FROM busybox`` alone, exported
to a directory, unpacks the base image, a cached rebuild of it measures the fixed cost (start-up, resolving, export),
then the build with the RUN steps runs every step cold. Per step = (build - fixed) / steps.
``--user`` runs dockbuild as that (unprivileged) user, for the rootless figure.
``--networks`` builds the steps once per ``--network`` mode in each round, interleaved
(default: the isolated ``default`` and ``none``), and prints what the first adds per step
over each other one.

Wall time is the goal's measure; the CPU time per step (every process of the build,
fork server and containers included) is printed beside it, with the load average: on a
busy machine the wall time grows with the load, the CPU time much less.
"""

from __future__ import annotations

import argparse
import os
import resource
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


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run (CPU: the command and all it waited for)."""
    start, cpu = time.perf_counter(), _cpu()
    done = subprocess.run(cmd, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr.decode(errors='replace')}")
    return elapsed, _cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--executor", default=None)
    parser.add_argument("--user", default=None, help="run dockbuild as this user (rootless)")
    parser.add_argument("--networks", default="default,none", help="--network modes, compared")
    options = parser.parse_args()
    base = tempfile.mkdtemp(prefix="dockbuild-bench-")
    os.chmod(base, 0o755)
    try:
        empty = Path(base, "empty")
        steps = Path(base, "steps")
        one = Path(base, "one")
        for ctx, body in ((empty, ""), (steps, "RUN true\n" * options.steps), (one, "RUN true\n")):
            ctx.mkdir()
            (ctx / "Dockerfile").write_text("FROM busybox\n" + body)
        networks = options.networks.split(",")
        per_step: dict[str, list[float]] = {n: [] for n in networks}
        cpu_per_step: dict[str, list[float]] = {n: [] for n in networks}
        for round_ in range(options.rounds):
            root = Path(base, f"root{round_}")
            prefix: list[str] = []
            command = [DOCKBUILD]
            env = dict(os.environ, DOCKBUILD_ROOT=str(root))
            if options.user:
                root.mkdir()
                shutil.chown(root, options.user)
                prefix = ["runuser", "-u", options.user, "--"]
                # The venv's interpreter may sit in a private home: use the system one
                # of the same version with the venv's packages.
                site = (
                    Path(sys.executable).parents[1]
                    / "lib"
                    / f"python{sys.version_info[0]}.{sys.version_info[1]}"
                    / "site-packages"
                )
                python = shutil.which(
                    f"python{sys.version_info[0]}.{sys.version_info[1]}", path="/usr/bin"
                )
                command = [python or "/usr/bin/python3", "-m", "dockbuild"]
                env.update(PYTHONPATH=f"{REPO}:{site}", HOME=base)
            args = ["--progress=quiet", "--build-context", f"busybox=oci-layout://{BUSYBOX}"]
            if options.executor:
                args += ["--executor", options.executor]
            cmd = [*prefix, *command, *args]
            # Unpack the base image into the cache: base layers stay packed until a step
            # reads their files, and a local export is such a reader. Without this the
            # first RUN would pay the unpack, which the fixed cost below does not contain.
            # In a directory of its own, owned by the user: the export writes beside it.
            warm = Path(base, f"warm{round_}")
            warm.mkdir()
            if options.user:
                shutil.chown(warm, options.user)
            timed([*cmd, "-o", f"type=local,dest={warm / 'rootfs'}", str(empty)], env)
            # What the first RUN on a new cache root pays once (the snapshotter's probe, ...)
            # is paid here, in each mode, not by the mode measured first.
            for network in networks:
                timed([*cmd, "--no-cache", f"--network={network}", str(one)], env)
            fixed_runs = [timed([*cmd, str(empty)], env) for _ in range(3)]
            fixed, fixed_cpu = min(w for w, _ in fixed_runs), min(c for _, c in fixed_runs)
            # The modes take turns at going first (the machine's speed drifts).
            for network in networks[round_ % len(networks) :] + networks[: round_ % len(networks)]:
                # Cold every time: --no-cache, so the modes share the unpacked base.
                total, total_cpu = timed(
                    [*cmd, "--no-cache", f"--network={network}", str(steps)], env
                )
                per_step[network].append((total - fixed) / options.steps * 1000)
                cpu_per_step[network].append((total_cpu - fixed_cpu) / options.steps * 1000)
                print(
                    f"round {round_ + 1} --network={network}: {options.steps} steps in "
                    f"{total * 1000:.0f} ms, fixed {fixed * 1000:.0f} ms -> "
                    f"{per_step[network][-1]:.1f} ms per RUN (CPU {cpu_per_step[network][-1]:.1f} "
                    f"ms per RUN; load average {os.getloadavg()[0]:.1f})"
                )
        who = f"as {options.user}" if options.user else f"as uid {os.geteuid()}"
        for network in networks:
            wall, cpu = per_step[network], cpu_per_step[network]
            print(
                f"executor={options.executor or 'auto'} {who} --network={network}: per RUN "
                f"median {statistics.median(wall):.1f} ms (min {min(wall):.1f}, max "
                f"{max(wall):.1f}); CPU per RUN median {statistics.median(cpu):.1f} ms"
            )
        first = networks[0]
        for other in networks[1:]:
            # Paired by round: both builds ran back to back under the same load.
            added = [a - b for a, b in zip(per_step[first], per_step[other], strict=True)]
            print(
                f"--network={first} adds {statistics.median(added):.1f} ms per RUN over "
                f"--network={other} (median of rounds; {', '.join(f'{x:.1f}' for x in added)})"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
