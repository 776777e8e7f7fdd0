"""Incremental context hashing: a context of 20,000 small files plus a few large ones
(about 300 MB), built three times through the real CLI: first build, unchanged rebuild,
rebuild after editing one file. Goal: the unchanged rebuild under 0.3 s.

Run as root: ``.venv/bin/python bench/context_hashing.py [--files N] [--large-mb M]``.
The Dockerfile copies the whole context in a first stage and one file of it into the
exported image, so every build computes the key of ``COPY . /app`` (a walk of the whole
context) but exports only a small image. The in-process figures time the context
checksum alone (``LocalDir.checksum`` with the digest table of the cache db).
"""

from __future__ import annotations

import argparse
import os
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


def build(ctx: Path, out: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [DOCKBUILD, "--progress=quiet", "--build-context",
         f"busybox=oci-layout://{REPO / 'testdata/images/busybox'}",
         "-o", f"type=local,dest={out}", str(ctx)],
        env=env, check=True, stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


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
        print(f"first build            {build(ctx, base / 'o1', env):7.3f} s")
        print(f"unchanged rebuild      {build(ctx, base / 'o2', env):7.3f} s")
        edited = ctx / "d7" / "f7.txt"
        edited.write_text("edited\n")
        os.utime(edited, (time.time() - 60,) * 2)
        print(f"rebuild, 1 file edited {build(ctx, base / 'o3', env):7.3f} s")
        print(f"unchanged rebuild      {build(ctx, base / 'o4', env):7.3f} s")
        db = base / "cache" / "db.sqlite"
        print(f"checksum alone, unchanged (new process state) {checksum_alone(ctx, db):7.3f} s")
        start = time.perf_counter()
        subprocess.run([DOCKBUILD, "version"], check=True, stdout=subprocess.DEVNULL)
        print(f"for scale: `dockbuild version` {time.perf_counter() - start:7.3f} s")


if __name__ == "__main__":
    main()
