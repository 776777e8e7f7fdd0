"""Registry cache round trip on a typical app: dockbuild vs BuildKit inside dockerd.

The workload (lab-style "typical app"): a base image, a dependency step (~20 MB of
files), a source COPY and a build step. For each builder:

- cold: empty cache, build and export the cache to a local registry
  (dockbuild: ``--cache-to type=registry,mode=min``; BuildKit: inline cache in the image,
  ``BUILDKIT_INLINE_CACHE=1`` + ``docker push``);
- warm: empty cache again, build with ``--cache-from`` the registry.

Both cold times include the push of the cache (dockbuild: the cache manifest and its
layers; BuildKit: ``docker push`` of the image that carries the inline cache). dockbuild
writes an OCI tarball; BuildKit stores the image in dockerd. BuildKit is driven through
the Engine API with an uploaded context tar (this host's docker CLI has no buildx).

The two builders run one after the other within each run (interleaved), so a busy
machine slows both alike; the load average is printed before and after. For dockbuild
the CPU time (user + sys of the process) is printed too: it is steadier than wall time.

Run as root with dockerd up (``.ci/start-dockerd``), after
``.venv/bin/python -m compileall -q dockbuild`` so start-up is not measured compiling:
``env -u PYTHONDONTWRITEBYTECODE .venv/bin/python bench/cache_roundtrip.py [--runs 5]``.
Needs docker-registry, skopeo and the busybox layout (``make testdata``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKBUILD = str(Path(sys.executable).with_name("dockbuild"))
BUSYBOX = REPO / "testdata" / "images" / "busybox"

DOCKERFILE = """\
FROM {base}
WORKDIR /app
COPY deps.txt ./
RUN mkdir -p /deps && for i in $(seq 1 200); do dd if=/dev/urandom of=/deps/lib$i bs=1k count=100 2>/dev/null; done
COPY src/ ./src/
RUN cat src/*.txt > /app/build.out
"""


def sh(*cmd: str, env: dict[str, str] | None = None, quiet: bool = True) -> None:
    done = subprocess.run(cmd, env=env, capture_output=quiet, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout}{done.stderr}")


def timed(*cmd: str, env: dict[str, str] | None = None, cpu: list[float] | None = None) -> float:
    """Wall seconds of a command; its CPU seconds (user + sys) are appended to ``cpu``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    sh(*cmd, env=env)
    elapsed = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return elapsed


def buildkit_build(context_tar: Path, tag: str, *, inline_cache: bool = False, cache_from: str | None = None) -> float:
    """BuildKit inside dockerd, through the Engine API (POST /build?version=2): the docker
    CLI here has no buildx plugin, and the API needs none for an uploaded context."""
    query = {"version": "2", "t": tag, "q": "1"}
    if inline_cache:
        query["buildargs"] = json.dumps({"BUILDKIT_INLINE_CACHE": "1"})
    if cache_from:
        query["cachefrom"] = json.dumps([cache_from])
    url = "http://localhost/v1.41/build?" + urllib.parse.urlencode(query)
    start = time.monotonic()
    done = subprocess.run(
        ["curl", "-sS", "--unix-socket", "/var/run/docker.sock", "-X", "POST", url,
         "-H", "Content-Type: application/x-tar", "--data-binary", f"@{context_tar}"],
        capture_output=True, text=True,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    errors = [line for line in done.stdout.splitlines() if '"error"' in line]
    if done.returncode != 0 or errors:
        sys.exit(f"BuildKit build failed: {done.stderr}{errors}")
    return elapsed


def start_registry(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "storage")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "bench"},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yml").write_text(json.dumps(config))
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(root / "config.yml")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("docker-registry did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-buildkit", action="store_true")
    options = parser.parse_args()
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="dockbuild-bench-") as tmp_text:
        tmp = Path(tmp_text)
        reg_proc, reg = start_registry(tmp / "registry")
        try:
            base = f"{reg}/library/busybox:latest"
            sh("skopeo", "copy", "--dest-tls-verify=false", f"oci:{BUSYBOX}:latest", f"docker://{base}")
            ctx = tmp / "ctx"
            (ctx / "src").mkdir(parents=True)
            (ctx / "Dockerfile").write_text(DOCKERFILE.format(base=base))
            (ctx / "deps.txt").write_text("lib1==1.0\nlib2==2.0\n")
            for i in range(20):
                (ctx / "src" / f"m{i}.txt").write_text(f"module {i}\n" * 50)
            context_tar = tmp / "ctx.tar"
            sh("tar", "-C", str(ctx), "-cf", str(context_tar), ".")
            results: dict[str, list[float]] = {"dockbuild cold": [], "dockbuild warm": [],
                                               "buildkit cold": [], "buildkit warm": []}  # fmt: skip
            cpu: dict[str, list[float]] = {"dockbuild cold": [], "dockbuild warm": []}
            env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
            for run in range(options.runs):
                cache_ref = f"{reg}/bench/app:cache{run}"
                root = tmp / f"root{run}"
                env["DOCKBUILD_ROOT"] = str(root)
                results["dockbuild cold"].append(timed(
                    DOCKBUILD, "--progress=quiet", "-o", f"type=oci,dest={tmp / 'a.tar'}",
                    "--cache-to", f"type=registry,ref={cache_ref}", str(ctx), env=env,
                    cpu=cpu["dockbuild cold"]))
                shutil.rmtree(root)
                results["dockbuild warm"].append(timed(
                    DOCKBUILD, "--progress=quiet", "-o", f"type=oci,dest={tmp / 'b.tar'}",
                    "--cache-from", f"type=registry,ref={cache_ref}", str(ctx), env=env,
                    cpu=cpu["dockbuild warm"]))
                shutil.rmtree(root)
                if options.skip_buildkit:
                    continue
                image = f"{reg}/bench/bk:run{run}"
                sh("docker", "builder", "prune", "-af")
                subprocess.run(["docker", "rmi", "-f", base], capture_output=True)
                start = time.monotonic()
                buildkit_build(context_tar, image, inline_cache=True)
                sh("docker", "push", image)
                results["buildkit cold"].append(time.monotonic() - start)
                sh("docker", "builder", "prune", "-af")
                subprocess.run(["docker", "rmi", "-f", image, base], capture_output=True)
                results["buildkit warm"].append(buildkit_build(context_tar, image + "-warm", cache_from=image))
                subprocess.run(["docker", "rmi", "-f", image + "-warm"], capture_output=True)
            print(f"load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
            print(f"{'builder / phase':<18}{'median s':>10}{'min s':>9}{'cpu s':>8}   runs (wall s)")
            for name, values in results.items():
                if values:
                    spent = f"{statistics.median(cpu[name]):>8.2f}" if name in cpu else f"{'-':>8}"
                    print(f"{name:<18}{statistics.median(values):>10.2f}{min(values):>9.2f}{spent}   "
                          + " ".join(f"{v:.2f}" for v in values))
            if results["buildkit warm"]:
                ratio = statistics.median(results["dockbuild warm"]) / statistics.median(results["buildkit warm"])
                print(f"warm from registry, dockbuild / BuildKit (medians): {ratio:.2f} (goal: <= 1.00)")
        finally:
            reg_proc.kill()
            reg_proc.wait()


if __name__ == "__main__":
    main()
