"""Failure figures: builds killed at random moments, a cache on a full disk, concurrent
builds on one cache, and builds stopped by SIGINT/SIGTERM, through the real CLI.

Run as root: ``.venv/bin/python bench/chaos.py [--kills 50] [--concurrent 10] [--seed N]``.
It prints a table (the one in docs/cache.md). tests/cli/test_chaos.py runs the same
scenarios with small counts.

- **kill**: a multi-stage build (local busybox base, RUN, COPY, cache export to a local
  directory; with ``--push HOST/REPO:TAG`` a push too) started with ``--no-cache`` and
  SIGKILLed at a random moment of its run; after each kill the next build must succeed,
  give the digest of an undisturbed build (SOURCE_DATE_EPOCH, rewrite-timestamp),
  ``dockbuild debug check-cache`` must find nothing broken, and no mount or process of
  the killed build may be left.
- **full disk**: the cache root on a 64 MB tmpfs that a build fills: a clear "no space
  left" error naming the cache root and ``dockbuild prune``, then a consistent cache.
- **concurrent**: overlapping Dockerfiles built at once on one cache root: all succeed,
  identical inputs give identical digests.
- **signals**: SIGINT and SIGTERM mid-RUN: exit 130 and 143, nothing left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKBUILD = str(Path(sys.executable).with_name("dockbuild"))
BUSYBOX = REPO / "testdata" / "images" / "busybox"
EPOCH = "1700000000"
# In the environment of every RUN of the scenarios: a step's processes are found by it
# (by this process's pid: another run of the scenarios on the machine is not ours).
MARKER = f"DOCKBUILD_CHAOS=step-{os.getpid()}"

MULTI_STAGE = f"""\
FROM busybox AS deps
ENV {MARKER}
RUN seq 1 300000 > /deps.txt && sleep 0.3
FROM busybox AS app
ENV {MARKER}
COPY src/ /src/
RUN cat /src/* | sort > /app.txt && sleep 0.3
FROM busybox
ENV {MARKER}
COPY --from=deps /deps.txt /opt/
COPY --from=app /app.txt /opt/
RUN cd /opt && sha256sum deps.txt app.txt > sums && sleep 0.2
"""


@dataclass
class Row:
    scenario: str
    runs: int = 0
    ok: int = 0
    notes: list[str] = field(default_factory=list)

    def fail(self, note: str) -> None:
        self.notes.append(note)


@dataclass
class Chaos:
    """One cache root and the context the scenarios build."""

    root: Path
    work: Path
    busybox: Path = BUSYBOX

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, DOCKBUILD_ROOT=str(self.root), SOURCE_DATE_EPOCH=EPOCH)
        env.pop("DOCKBUILD_DEBUG", None)
        env.update(extra)
        return env

    def context(self, name: str = "ctx", dockerfile: str = MULTI_STAGE) -> Path:
        ctx = self.work / name
        (ctx / "src").mkdir(parents=True, exist_ok=True)
        for i in range(20):
            (ctx / "src" / f"f{i}.txt").write_text(f"file {i}\n" * 100)
        (ctx / "Dockerfile").write_text(dockerfile)
        return ctx

    def command(self, ctx: Path, out: Path, *extra: str) -> list[str]:
        return [
            DOCKBUILD, "build", "--progress=plain",
            "--build-context", f"busybox=oci-layout://{self.busybox}",
            "-o", f"type=oci,rewrite-timestamp=true,dest={out}", *extra, str(ctx),
        ]  # fmt: skip

    def build(self, ctx: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(ctx, out, *extra), env=self.env(), capture_output=True, text=True, timeout=600
        )

    def check_cache(self) -> str | None:
        """None when `dockbuild debug check-cache` finds nothing broken, else its output."""
        run = subprocess.run(
            [DOCKBUILD, "debug", "check-cache"], env=self.env(), capture_output=True, text=True, timeout=600
        )
        return None if run.returncode == 0 and "cache OK" in run.stdout else run.stdout + run.stderr

    def left_behind(self) -> list[str]:
        """Mounts under the cache root and processes of a build on it that are still here."""
        found = []
        root = str(self.root)
        with open("/proc/self/mountinfo") as f:
            found += [f"mount {line.split()[4]}" for line in f if root in line.split()[4]]
        me = os.getpid()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == me:
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except FileNotFoundError:
                continue  # gone meanwhile
            except OSError:
                continue
            # dockbuild's own processes carry the cache root; a step's, the marker.
            if f"DOCKBUILD_ROOT={root}\0".encode() in environ or f"{MARKER}\0".encode() in environ:
                found.append(f"process {pid} {cmdline[:80]!r}")
        return found


def digest_of(archive: Path) -> str:
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    return str(index["manifests"][0]["digest"])


def reference_digest(work: Path) -> tuple[str, float]:
    """The digest of an undisturbed build in a cache root of its own, and its time."""
    clean = Chaos(work / "reference-root", work)
    ctx = clean.context("reference-ctx")
    start = time.monotonic()
    run = clean.build(ctx, work / "reference.tar")
    if run.returncode != 0:
        raise SystemExit(f"the undisturbed build failed:\n{run.stderr}")
    return digest_of(work / "reference.tar"), time.monotonic() - start


def wait_gone(chaos: Chaos, seconds: float = 10.0) -> list[str]:
    """What is left behind once the killed build's processes had time to go."""
    deadline = time.monotonic() + seconds
    while True:
        left = chaos.left_behind()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def kills(chaos: Chaos, count: int, rng: random.Random, push: str | None = None) -> Row:
    """``count`` builds SIGKILLed at random moments, each followed by a build that must
    succeed with the reference digest and leave a consistent cache."""
    row = Row("SIGKILL at a random moment")
    expected, seconds = reference_digest(chaos.work)
    ctx = chaos.context()
    extra = ["--cache-to", f"type=local,dest={chaos.work / 'exported'}"]
    if push:
        extra += ["-t", push, "--push"]
    for i in range(count):
        row.runs += 1
        proc = subprocess.Popen(
            chaos.command(ctx, chaos.work / "killed.tar", "--no-cache", *extra),
            env=chaos.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(rng.uniform(0, seconds * 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = wait_gone(chaos)
        if left:
            row.fail(f"kill {i}: left behind: {', '.join(left[:3])}")
        after = chaos.build(ctx, chaos.work / "after.tar", *extra)
        if after.returncode != 0:
            row.fail(f"kill {i}: the next build failed: {after.stderr.strip().splitlines()[-1:]}")
            continue
        problems = chaos.check_cache()
        if problems:
            row.fail(f"kill {i}: check-cache: {problems.strip().splitlines()[:2]}")
            continue
        if digest_of(chaos.work / "after.tar") != expected:
            row.fail(f"kill {i}: digest {digest_of(chaos.work / 'after.tar')} != {expected}")
            continue
        row.ok += 1
    return row


def full_disk(work: Path) -> Row:
    """The cache root on a 64 MB tmpfs that a build fills."""
    row = Row("cache on a full 64 MB tmpfs")
    mountpoint = work / "tmpfs"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        row.fail(f"skipped: cannot mount a tmpfs here ({mounted.stderr.strip()})")
        return row
    try:
        chaos = Chaos(mountpoint / "cache", work)
        ctx = chaos.context("big-ctx", "FROM busybox\nCOPY a.bin /\nCOPY b.bin /\n")
        for name in ("a.bin", "b.bin"):
            (ctx / name).write_bytes(os.urandom(40 << 20))
        row.runs += 1
        run = chaos.build(ctx, work / "big.tar")
        message = run.stderr
        if run.returncode != 1:
            row.fail(f"exit status {run.returncode}, expected 1")
        elif "no space left" not in message or str(chaos.root) not in message or "dockbuild prune" not in message:
            row.fail(f"unclear error: {message.strip().splitlines()[-2:]}")
        elif "Traceback" in message:
            row.fail("a traceback")
        else:
            problems = chaos.check_cache()
            if problems:
                row.fail(f"check-cache: {problems.strip().splitlines()[:2]}")
            else:
                small = chaos.context("small-ctx", "FROM busybox\nRUN echo fits > /f\n")
                if chaos.build(small, work / "small.tar").returncode != 0:
                    row.fail("a small build failed afterwards")
                else:
                    row.ok += 1
        left = chaos.left_behind()
        if left:
            row.fail(f"left behind: {left[:3]}")
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    return row


def concurrent(chaos: Chaos, count: int) -> Row:
    """``count`` builds at once on one cache root: half as many Dockerfiles, each built
    twice, all sharing their first stage."""
    row = Row(f"{count} concurrent overlapping builds")
    variants = max(1, count // 2)
    contexts = [
        chaos.context(f"variant-{v}", MULTI_STAGE + f"RUN echo variant {v} > /variant\n") for v in range(variants)
    ]
    results: dict[int, tuple[int, str, str]] = {}

    def one(n: int) -> None:
        out = chaos.work / f"concurrent-{n}.tar"
        run = chaos.build(contexts[n % variants], out)
        results[n] = (run.returncode, digest_of(out) if run.returncode == 0 else "", run.stderr)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row.runs = count
    digests: dict[int, set[str]] = {}
    for n, (status, digest, stderr) in sorted(results.items()):
        if status != 0:
            row.fail(f"build {n} failed: {stderr.strip().splitlines()[-1:]}")
            continue
        digests.setdefault(n % variants, set()).add(digest)
        row.ok += 1
    for v, found in digests.items():
        if len(found) != 1:
            row.fail(f"variant {v}: {len(found)} different digests")
            row.ok = 0
    if len({next(iter(d)) for d in digests.values()}) != len(digests):
        row.fail("different Dockerfiles gave the same digest")
    problems = chaos.check_cache()
    if problems:
        row.fail(f"check-cache: {problems.strip().splitlines()[:2]}")
    return row


def stop_with(chaos: Chaos, signum: int) -> tuple[int | None, float, list[str]]:
    """A build stopped by ``signum`` mid-RUN: its exit status, how long it took to exit,
    and what it left behind."""
    ctx = chaos.context(f"signal-{signum}", f"FROM busybox\nENV {MARKER}\nRUN echo started && sleep 300\n")
    proc = subprocess.Popen(
        chaos.command(ctx, chaos.work / "signal.tar"),
        env=chaos.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.rstrip().endswith(" started"):
            break
    start = time.monotonic()
    proc.send_signal(signum)
    try:
        status: int | None = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        status = None
    took = time.monotonic() - start
    proc.stderr.close()
    return status, took, wait_gone(chaos, 5.0)


def signals(chaos: Chaos) -> list[Row]:
    rows = []
    for signum, expected in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        row = Row(f"{signal.Signals(signum).name} mid-RUN")
        row.runs = 1
        status, took, left = stop_with(chaos, signum)
        if status != expected:
            row.fail(f"exit status {status}, expected {expected}")
        elif left:
            row.fail(f"left behind: {left[:3]}")
        elif took > 2.0:
            row.fail(f"exited after {took:.1f}s")
        else:
            row.ok = 1
        row.notes.append(f"exited in {took:.2f}s")
        rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| scenario | runs | passed | notes |", "|---|---|---|---|"]
    for r in rows:
        notes = "; ".join(r.notes[:4]) + (f" (+{len(r.notes) - 4} more)" if len(r.notes) > 4 else "")
        lines.append(f"| {r.scenario} | {r.runs} | {r.ok} | {notes} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--concurrent", type=int, default=10)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--push", metavar="HOST/REPO:TAG", help="also push to this (loopback) registry")
    parser.add_argument("--registry", action="store_true", help="start Debian's docker-registry on loopback (tests/registry_fixture.py) and push to it")
    parser.add_argument("--only", choices=("kill", "disk", "concurrent", "signals"), help="one scenario")
    options = parser.parse_args()
    # Started in the background by a shell, the bench inherits SIGINT ignored, and so would
    # every build it starts: the SIGINT scenario needs the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rng = random.Random(options.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dockbuild-chaos-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        if options.registry:
            sys.path.insert(0, str(REPO / "tests"))
            import registry_fixture

            registry = registry_fixture._start_registry(work / "registry")
            stack.callback(registry_fixture._stop_registry, registry)
            options.push = f"{registry.host}/chaos/app:1"
        if options.only in (None, "kill"):
            rows.append(kills(Chaos(work / "kill-root", work), options.kills, rng, options.push))
            print(table(rows), flush=True)
        if options.only in (None, "disk"):
            rows.append(full_disk(work))
        if options.only in (None, "concurrent"):
            rows.append(concurrent(Chaos(work / "concurrent-root", work), options.concurrent))
        if options.only in (None, "signals"):
            rows += signals(Chaos(work / "signal-root", work))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
