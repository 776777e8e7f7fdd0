"""Nothing changed: the no-op rebuild and the cached re-export, for one or more dockbuilds.

    .venv/bin/python bench/noop_rebuild.py [--runs N] [--big N] [--docker] [DOCKBUILD ...]

Each DOCKBUILD (a console script; default: the one beside this interpreter) is measured
on the same workloads, interleaved run by run, so a busy machine slows all alike:

- ``noop``: a 5-step busybox Dockerfile with a 30-file context, rebuilt on a terminal
  (nothing to export, every step cached);
- ``oci``: the same build exported as an OCI tar (a cached re-export of a ~1 MB image);
- ``big``: a no-op rebuild with a ``--big``-file context (COPY . /app), beside a plain
  stat walk of that context (``os.walk`` + ``lstat`` in this process);
- ``local``: the big build exported with ``-o type=local`` into a new directory each
  time (fresh) and into the same directory again (unchanged re-export);
- ``python``: the interpreter's own start (``python -c pass`` from the venv), the floor,
  and the console script's floor: the interpreter importing what the script pip writes
  imports (``re``, ``dockbuild.__main__``) and nothing else;
- with ``--docker``: ``docker build`` of the small context in the running dockerd (its
  busybox base loaded from the local image as ``--docker-tag``, removed afterwards),
  and ``docker save`` of the image built, beside ``oci``.

``--no-local`` leaves the big context's local exports out (they take seconds each).

Wall time and CPU time (user+sys of the child, from ``getrusage``) are printed, median
and minimum: CPU time is what a shared machine disturbs least. Goals (issue 16): noop at
most 70 ms, big at most 1.2x the stat walk, oci at most 80 ms, unchanged local
re-export at most 0.3x a fresh one.
"""

from __future__ import annotations

import argparse
import os
import pty
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUSYBOX = REPO / "testdata" / "images" / "busybox"
BASE = ["--build-context", f"busybox=oci-layout://{BUSYBOX}"]

DOCKERFILE = """\
FROM busybox
ENV APP=/app
RUN echo one > /one
COPY src/ /app/src/
RUN ls /app/src > /list
LABEL bench=noop
"""

BIG_DOCKERFILE = "FROM busybox\nCOPY . /app\n"


def make_context(path: Path, files: int, dockerfile: str, docker_base: str | None = None) -> Path:
    text = dockerfile.replace("FROM busybox", f"FROM {docker_base}") if docker_base else dockerfile
    path.mkdir(parents=True)
    (path / "Dockerfile").write_text(text)
    for i in range(files):
        sub = path / "src" / f"d{i // 500:03}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05}.txt").write_text(f"file {i}\n" * 4)
    return path


def run(cmd: list[str], env: dict[str, str], tty: bool = False) -> tuple[float, float]:
    """Wall and CPU seconds (user+sys of the child) of one command."""
    main = side = None
    if tty:
        main, side = pty.openpty()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=side if tty else subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if main is not None and side is not None:
        os.close(main)
        os.close(side)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr.decode()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def stat_walk(root: Path) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lstat(os.path.join(top, name))
    return time.perf_counter() - start, time.process_time() - cpu


def show(name: str, samples: list[tuple[float, float]]) -> None:
    walls = [s[0] * 1000 for s in samples]
    cpus = [s[1] * 1000 for s in samples]
    print(
        f"  {name:<44} wall median {statistics.median(walls):7.1f} ms (min {min(walls):7.1f})"
        f"   cpu median {statistics.median(cpus):7.1f} ms (min {min(cpus):7.1f})"
    )


def docker_runs(args: argparse.Namespace, work: Path, results: dict[str, list[tuple[float, float]]]) -> None:
    """docker build of the small context (no-op) and docker save of its image, in dockerd."""
    exe = args.dockbuilds[0]
    tag = args.docker_tag
    image = tag.rpartition(":")[0] + "-noop:latest"
    base = make_context(work / "dbase", 0, "FROM busybox\n")
    # BuildKit when docker has buildx; the legacy builder (also a warm daemon) otherwise.
    buildkit = subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0
    env = dict(os.environ, DOCKER_BUILDKIT="1" if buildkit else "0")
    builder = "BuildKit" if buildkit else "legacy builder"
    with subprocess.Popen(["docker", "load", "-q"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL) as load:
        subprocess.run([exe, "--progress=quiet", *BASE, "-t", tag, "-o", "type=docker,dest=-", str(base)],
                       stdout=load.stdin, check=True, env=dict(os.environ, DOCKBUILD_ROOT=str(work / "droot")))
        load.stdin.close()  # type: ignore[union-attr]
    try:
        small = make_context(work / "dsmall", 30, DOCKERFILE, tag)
        run(["docker", "build", "-q", "-t", image, str(small)], env)
        for _ in range(args.runs):
            results.setdefault(f"docker build ({builder}, warm dockerd), noop", []).append(
                run(["docker", "build", "-q", "-t", image, str(small)], env)
            )
            results.setdefault("docker save of that image (beside oci)", []).append(
                run(["docker", "save", "-o", str(work / "saved.tar"), image], env)
            )
    finally:
        subprocess.run(["docker", "rmi", "-f", image, tag], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--big", type=int, default=20000, help="files of the big context (0: skip)")
    parser.add_argument("--docker", action="store_true", help="also time docker build")
    parser.add_argument("--docker-tag", default="dockbuild-bench-busybox:latest", help="the base image's name in dockerd")
    parser.add_argument("--no-local", action="store_true", help="skip the big context's local exports")
    parser.add_argument("dockbuilds", nargs="*", default=[str(Path(sys.executable).with_name("dockbuild"))])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dockbuild-noop-") as tmp:
        work = Path(tmp)
        small = make_context(work / "small", 30, DOCKERFILE)
        big = make_context(work / "big", args.big, BIG_DOCKERFILE) if args.big else None
        results: dict[str, list[tuple[float, float]]] = {}
        envs = {}
        for n, exe in enumerate(args.dockbuilds):
            envs[exe] = dict(os.environ, DOCKBUILD_ROOT=str(work / f"root{n}"))
            run([exe, "--progress=quiet", *BASE, str(small)], envs[exe], tty=True)  # fill the cache
            if big is not None:
                run([exe, "--progress=quiet", *BASE, str(big)], envs[exe], tty=True)
        python = [str(Path(args.dockbuilds[0]).with_name("python")), "-c", "pass"]
        script_floor = [python[0], "-c", "import re; import dockbuild.__main__"]
        oci = str(work / "out.tar")
        for _ in range(args.runs):
            results.setdefault("python -c pass (the floor)", []).append(run(python, dict(os.environ)))
            results.setdefault("console script floor (import re, __main__)", []).append(
                run(script_floor, dict(os.environ))
            )
            for exe in args.dockbuilds:
                env = envs[exe]
                results.setdefault(f"{exe}|noop", []).append(
                    run([exe, "--progress=quiet", *BASE, str(small)], env, tty=True)
                )
                results.setdefault(f"{exe}|oci", []).append(
                    run([exe, "--progress=quiet", *BASE, "-o", f"type=oci,dest={oci}", str(small)], env)
                )
                if big is not None:
                    results.setdefault(f"{exe}|big", []).append(
                        run([exe, "--progress=quiet", *BASE, str(big)], env, tty=True)
                    )
                if big is not None and not args.no_local:
                    fresh = work / "fresh"
                    results.setdefault(f"{exe}|big -o type=local, fresh directory", []).append(
                        run([exe, "--progress=quiet", *BASE, "-o", f"type=local,dest={fresh}", str(big)], env)
                    )
                    shutil.rmtree(fresh)
                    same = work / f"same{args.dockbuilds.index(exe)}"
                    results.setdefault(f"{exe}|big -o type=local, same directory", []).append(
                        run([exe, "--progress=quiet", *BASE, "-o", f"type=local,dest={same}", str(big)], env)
                    )
            if big is not None:
                results.setdefault("stat walk of the big context", []).append(stat_walk(big))
        if args.docker and shutil.which("docker"):
            docker_runs(args, work, results)
    print(f"{args.runs} runs, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    for name, samples in results.items():
        if "|" not in name:
            show(name, samples)
    for exe in args.dockbuilds:
        print(exe)
        for name, samples in results.items():
            if name.startswith(exe + "|"):
                show(name.split("|", 1)[1], samples)


if __name__ == "__main__":
    main()
