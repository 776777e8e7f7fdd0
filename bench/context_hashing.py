"""Incremental context hashing: a context of 20,000 small files plus a few large ones
(about 300 MB), built three times through the real CLI: first build, unchanged rebuild,
rebuild after editing one file. Goal: the unchanged rebuild under 0.3 s.

Run as root: ``.venv/bin/python bench/context_hashing.py [--files N] [--large-mb M]``.
The Dockerfile copies the whole context in a first stage and one file of it into the
exported image, so every build computes the key of ``COPY . /app`` (a walk of the whole
context) but exports only a small image. The unchanged rebuild is timed with two
outputs: an OCI tarball (``-o type=oci,dest=FILE``, one file written: the goal's
figure) and a directory (``-o type=local``, the busybox rootfs: 286 files and links
created, whose cost on this VM's file system varies with how many files were deleted
there in the last minutes, and has nothing to do with the context). The in-process
figures time the context checksum alone (``LocalDir.checksum`` with the tables of the
cache db).

Each CLI figure is the wall time of the whole ``dockbuild`` process and, in brackets,
its CPU time (user + system): on a shared machine the wall time is noisy, the CPU time
much less so. The unchanged rebuild is run ``--repeat`` times; the best and the median
are shown. Byte-compile first (``python -m compileall -q dockbuild``) so start-up
figures are real.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKBUILD = str(Path(sys.executable).with_name("dockbuild"))
DOCKERFILE = """\
FROM busybox AS everything
COPY . /app
FROM busybox
COPY --from=everything /app/d0/f0.txt /picked.txt
"""


def make_context(root: Path, files: int, large: int, large_mb: int) -> None:
    old = time.time() - 3600  # files written an hour ago, as in a real checkout
    for i in range(files):
        d = root / f"d{i % 200}"
        if i < 200:
            d.mkdir(parents=True)
        p = d / f"f{i}.txt"
        p.write_bytes(f"small file {i}\n".encode() * 8)
        os.utime(p, (old, old))
    chunk = os.urandom(1 << 20)
    for i in range(large):
        p = root / f"large{i}.bin"
        with open(p, "wb") as f:
            for _ in range(large_mb):
                f.write(chunk)
        os.utime(p, (old, old))
    (root / "Dockerfile").write_text(DOCKERFILE)


def build(ctx: Path, out: Path, env: dict[str, str], output: str = "local") -> tuple[float, float]:
    """(wall, CPU) seconds of one CLI build."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [DOCKBUILD, "--progress=quiet", "--build-context",
         f"busybox=oci-layout://{REPO / 'testdata/images/busybox'}",
         "-o", f"type={output},dest={out}", str(ctx)],
        env=env, check=True, stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def show(label: str, figures: list[tuple[float, float]]) -> None:
    if len(figures) == 1:
        (wall, cpu), = figures
        print(f"{label:32s} {wall:7.3f} s   (cpu {cpu:6.3f} s)")
        return
    walls, cpus = sorted(f[0] for f in figures), sorted(f[1] for f in figures)
    print(
        f"{label:32s} {walls[0]:7.3f} s best, {statistics.median(walls):7.3f} s median"
        f"   (cpu {cpus[0]:6.3f} s best, {statistics.median(cpus):6.3f} s median; {len(figures)} runs)"
    )


def unchanged(ctx: Path, base: Path, env: dict[str, str], repeat: int, label: str) -> None:
    """The unchanged rebuild, to an OCI tarball and to a directory, runs interleaved."""
    oci, local = [], []
    for i in range(repeat):
        oci.append(build(ctx, base / f"unchanged{label.strip()}{i}.tar", env, "oci"))
        local.append(build(ctx, base / f"unchanged{label.strip()}{i}", env, "local"))
    show(f"unchanged rebuild{label}, oci", oci)
    show(f"unchanged rebuild{label}, local", local)


def checksum_alone(ctx: Path, db: Path) -> float:
    from dockbuild.engine.sources.local import FileDigests, LocalDir

    start = time.perf_counter()
    LocalDir(ctx, digests=FileDigests(db)).checksum([""])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--large", type=int, default=3)
    parser.add_argument("--large-mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5, help="unchanged rebuilds to time")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dockbuild-bench-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        ctx = base / "ctx"
        ctx.mkdir()
        make_context(ctx, options.files, options.large, options.large_mb)
        env = dict(os.environ, DOCKBUILD_ROOT=str(base / "cache"))
        os.environ["DOCKBUILD_ROOT"] = env["DOCKBUILD_ROOT"]
        size = sum(p.stat().st_size for p in ctx.rglob("*") if p.is_file())
        print(f"context: {options.files} small files + {options.large} large, {size / 1e6:.0f} MB")
        show("first build", [build(ctx, base / "o1", env)])
        unchanged(ctx, base, env, options.repeat, "")
        edited = ctx / "d7" / "f7.txt"
        edited.write_text("edited\n")
        os.utime(edited, (time.time() - 60,) * 2)
        show("rebuild, 1 file edited", [build(ctx, base / "o3", env)])
        unchanged(ctx, base, env, options.repeat, " again")
        db = base / "cache" / "db.sqlite"
        print(f"{'checksum alone, unchanged':32s} {checksum_alone(ctx, db):7.3f} s   (in-process, new db state)")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([DOCKBUILD, "version"], check=True, stdout=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        print(f"{'for scale: dockbuild version':32s} {time.perf_counter() - start:7.3f} s   (cpu {cpu:6.3f} s)")
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (wall times mean little above ~0.5)")


if __name__ == "__main__":
    main()
