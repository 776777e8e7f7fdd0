"""The cache through the real CLI: shared by concurrent builds, survives kill -9, checked,
measured (du), trimmed (prune, GC), bypassed per stage and explained."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from clitools import DOCKBUILD, DockbuildCLI, read_oci, write_context

EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}  # stable image digests across builds

SLOW_RUN = """\
FROM busybox
RUN sleep 1 && echo built > /built.txt
COPY app.txt /app.txt
"""


def statuses(stderr: str) -> dict[str, list[str]]:
    """Step name -> end states, from rawjson progress."""
    out: dict[str, list[str]] = {}
    for line in stderr.splitlines():
        try:
            status = json.loads(line)
        except ValueError:
            continue
        for v in status.get("vertexes", []) if isinstance(status, dict) else []:
            if "completed" in v:
                state = "cached" if v.get("cached") else "error" if v.get("error") else "done"
                out.setdefault(v["name"], []).append(state)
    return out


def step_status(stderr: str, fragment: str) -> str:
    found = [s for name, states in statuses(stderr).items() if fragment in name for s in states]
    assert len(found) == 1, (fragment, stderr)
    return found[0]


def oci_manifest_digest(path: Path) -> str:
    import tarfile

    with tarfile.open(path) as tf:
        index = json.loads(tf.extractfile("index.json").read())  # type: ignore[union-attr]
    return index["manifests"][0]["digest"]


def disk_bytes(root: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", str(root)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def parse_size(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(B|kB|MB|GB)", text)
    assert m, text
    return float(m.group(1)) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)]


def du_total(dockbuild: DockbuildCLI) -> float:
    out = dockbuild("du").out
    return parse_size(re.search(r"^Total:\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]


# -- safe sharing ------------------------------------------------------------------------


def test_concurrent_builds_share_the_cache_and_run_an_identical_step_once(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": SLOW_RUN, "app.txt": "v1\n"})
    procs = []
    for i in range(3):
        procs.append(
            subprocess.Popen(
                [DOCKBUILD, "--progress=rawjson", *dockbuild.base_context,
                 "-o", f"type=oci,dest={tmp_path / f'out{i}.tar'}", str(ctx)],
                env=dockbuild.env({"SOURCE_DATE_EPOCH": "1700000000"}),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    for code, err in results:
        assert code == 0, err
    runs = [step_status(err, "RUN sleep 1") for _, err in results]
    assert sorted(runs) == ["cached", "cached", "done"], runs
    digests = {oci_manifest_digest(tmp_path / f"out{i}.tar") for i in range(3)}
    assert len(digests) == 1  # all three outputs are the same image
    assert "cache OK" in dockbuild("debug", "check-cache").out


def test_prune_waits_for_a_running_build_and_never_pulls_its_layers_away(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    import http.server
    import threading

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the handler's protocol
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    # The RUN step goes on only once a server on loopback answers, which the test starts
    # after prune has said it waits: the build is surely running while prune looks. The
    # step reaches the host's loopback only on the host's network (--network=host).
    gate = http.server.HTTPServer(("127.0.0.1", 0), Answer, bind_and_activate=False)
    gate.server_bind()
    port = gate.server_address[1]
    wait = f"i=0; until wget -q -O /dev/null http://127.0.0.1:{port}/ || [ $i -ge 1200 ]; do sleep 0.1; i=$((i+1)); done"
    dockerfile = f"FROM busybox\nRUN {wait} && echo built > /built.txt\nCOPY app.txt /app.txt\n"
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": dockerfile, "app.txt": "v1\n"})
    build = subprocess.Popen(
        [DOCKBUILD, "--progress=plain", "--network=host", *dockbuild.base_context, "-o", f"type=local,dest={tmp_path / 'out'}", str(ctx)],
        env=dockbuild.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    prune = serving = None
    try:
        assert build.stderr is not None
        for line in build.stderr:
            if "RUN i=0" in line:
                break
        prune = subprocess.Popen(
            [DOCKBUILD, "prune", "-f", "--all"], env=dockbuild.env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        assert prune.stderr is not None
        said = prune.stderr.readline()
        assert "waiting for running builds to finish" in said, said
        gate.server_activate()
        serving = threading.Thread(target=gate.serve_forever, daemon=True)
        serving.start()
        assert build.wait(timeout=120) == 0, build.stderr.read()
        assert prune.wait(timeout=60) == 0, prune.stderr.read()
    finally:
        if serving is not None:
            gate.shutdown()
        gate.server_close()
        for proc in (build, prune):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert (tmp_path / "out" / "built.txt").read_text() == "built\n"
    assert (tmp_path / "out" / "app.txt").read_text() == "v1\n"
    assert dockbuild("debug", "check-cache").out.strip() == "cache OK"


def _kill_when(dockbuild: DockbuildCLI, ctx: Path, out: Path, marker: str, delay: float) -> None:
    proc = subprocess.Popen(
        [DOCKBUILD, "--progress=plain", *dockbuild.base_context, "-o", f"type=oci,dest={out}", str(ctx)],
        env=dockbuild.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    assert proc.stderr is not None
    for line in proc.stderr:
        seen += line
        if marker in line:
            break
    else:
        proc.wait()
        pytest.fail(f"the build ended before {marker!r}:\n{seen}")
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    ("marker", "delay"),
    [
        ("FROM busybox", 0.0),  # while the base image is pulled (and unpacked for RUN)
        ("RUN dd", 0.3),  # while RUN writes its output
        ("exporting layers", 0.05),  # while layer blobs are compressed
    ],
)
def test_kill_9_at_any_moment_leaves_a_cache_the_next_build_uses(
    dockbuild: DockbuildCLI, tmp_path: Path, marker: str, delay: float
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox\nRUN dd if=/dev/urandom of=/big bs=1M count=24 2>/dev/null && sleep 0.5\n"
            "COPY app.txt /app.txt\n",
            "app.txt": "v1\n",
        },
    )
    _kill_when(dockbuild, ctx, tmp_path / "killed.tar", marker, delay)
    assert not (tmp_path / "killed.tar").exists()  # no half-written output
    again = dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'out.tar'}")
    assert "ERROR" not in again.stderr
    assert oci_manifest_digest(tmp_path / "out.tar").startswith("sha256:")
    check = dockbuild("debug", "check-cache", check=False)
    assert check.returncode == 0 and check.out.strip() == "cache OK", check.out
    third = dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'out2.tar'}")
    assert third.stderr.count("CACHED") >= 3  # FROM, RUN, COPY all reused


def test_kill_9_while_the_snapshotter_is_probed_leaves_nothing_the_next_build_keeps(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    # A fresh cache root: the first RUN probes which snapshotter works there, in a folder
    # under tmp/. A build killed meanwhile must leave a folder the next build sweeps.
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN echo hi > /hi\n"})
    proc = subprocess.Popen(
        [DOCKBUILD, "--progress=plain", *dockbuild.base_context, "-o", f"type=oci,dest={tmp_path / 'killed.tar'}", str(ctx)],
        env=dockbuild.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    probing: list[Path] = []
    while proc.poll() is None and not probing:
        probing = list((dockbuild.root / "tmp").glob("*probe*")) if (dockbuild.root / "tmp").is_dir() else []
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert probing and proc.returncode == -signal.SIGKILL, "the probe ended before it could be killed"
    dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'out.tar'}")
    check = dockbuild("debug", "check-cache", check=False)
    assert check.returncode == 0 and check.out.strip() == "cache OK", check.out


def test_kill_9_during_a_registry_pull_leaves_a_cache_the_next_build_uses(
    dockbuild: DockbuildCLI, tmp_path: Path, registry  # type: ignore[no-untyped-def]
) -> None:
    from registry_fixture import tiny_image

    image = tiny_image("amd64", content=os.urandom(32 << 20))  # a 32 MB layer blob
    image.push(registry, "big/base", "v1")
    ctx = write_context(
        tmp_path / "ctx", {"Dockerfile": f"FROM {registry.host}/big/base:v1\nCOPY app.txt /app.txt\n", "app.txt": "v1\n"}
    )
    proc = subprocess.Popen(
        [DOCKBUILD, "--progress=plain", "-o", f"type=oci,dest={tmp_path / 'killed.tar'}", str(ctx)],
        env=dockbuild.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    partial = []
    while proc.poll() is None and not partial:  # a download in progress: a .part file with bytes
        partial = [p for p in dockbuild.root.rglob("*.part") if p.stat().st_size > 0]
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert partial and proc.returncode == -signal.SIGKILL, "the pull ended before it could be killed"
    assert not (tmp_path / "killed.tar").exists()

    again = dockbuild("--progress=plain", "-o", f"type=oci,dest={tmp_path / 'out.tar'}", str(ctx))
    assert "ERROR" not in again.stderr
    assert read_oci(tmp_path / "out.tar").manifest["layers"][0]["digest"] == image.layer_digest
    check = dockbuild("debug", "check-cache")
    assert check.out.strip() == "cache OK", check.out


def test_check_cache_reports_a_corrupt_blob_and_a_lost_layer_and_repair_drops_them(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nCOPY app.txt /app.txt\n", "app.txt": "v1\n"})
    dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'a.tar'}", env=EPOCH)
    assert dockbuild("debug", "check-cache").out.strip() == "cache OK"
    blobs = sorted((dockbuild.root / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    victim = blobs[-1]  # the base layer's blob
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    db = sqlite3.connect(dockbuild.root / "db.sqlite")
    (layers_json,) = db.execute("SELECT layers FROM records WHERE description LIKE '%COPY app.txt%'").fetchone()
    lost = json.loads(layers_json)[-1]
    lost_blobs = [row[0] for row in db.execute("SELECT digest FROM layer_blobs WHERE layer_id=?", (lost,))]
    db.close()
    # Lost: its directory and the blob it could be unpacked from again.
    subprocess.run(["rm", "-rf", str(dockbuild.root / "snapshots" / lost)], check=True)
    for digest in lost_blobs:
        (dockbuild.root / "blobs" / "sha256" / digest.partition(":")[2]).unlink()

    check = dockbuild("debug", "check-cache", check=False)
    assert check.returncode == 1
    assert f"blob sha256:{victim.name}: content has digest" in check.out
    assert f"layer {lost}: directory missing" in check.out
    assert "COPY app.txt" in check.out  # the record that used the lost layer
    repaired = dockbuild("debug", "check-cache", "--repair")
    assert "repaired: " in repaired.out
    assert dockbuild("debug", "check-cache").out.strip() == "cache OK"
    rebuilt = dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'b.tar'}", env=EPOCH)
    assert oci_manifest_digest(tmp_path / "a.tar") == oci_manifest_digest(tmp_path / "b.tar")
    assert "COPY app.txt" in rebuilt.stderr


def test_a_layer_whose_directory_is_gone_is_unpacked_again_from_its_blob(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nCOPY app.txt /app.txt\n", "app.txt": "v1\n"})
    dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'a.tar'}")
    for layer in (dockbuild.root / "snapshots").iterdir():
        subprocess.run(["rm", "-rf", str(layer)], check=True)
    assert dockbuild("debug", "check-cache").out.strip() == "cache OK"  # packed, not lost
    again = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'out'}")
    assert again.stderr.count("CACHED") >= 2
    assert (tmp_path / "out" / "app.txt").read_text() == "v1\n"
    assert (tmp_path / "out" / "bin" / "busybox").is_file()
    assert dockbuild("debug", "check-cache").out.strip() == "cache OK"


def test_a_cache_made_by_a_newer_dockbuild_is_refused_and_left_untouched(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nCOPY app.txt /app.txt\n", "app.txt": "v1\n"})
    dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'a.tar'}")
    db = sqlite3.connect(dockbuild.root / "db.sqlite")
    db.execute("PRAGMA user_version=99")
    db.commit()
    records = db.execute("SELECT count(*) FROM records").fetchone()[0]
    db.close()
    for args in (("du",), ("--progress=plain", *dockbuild.base_context, "-o", f"type=oci,dest={tmp_path / 'b.tar'}", str(ctx))):
        run = dockbuild(*args, check=False)
        assert run.returncode == 1
        assert "was made by a newer dockbuild (database schema 99" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    assert not (tmp_path / "b.tar").exists()
    db = sqlite3.connect(dockbuild.root / "db.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 99
    assert db.execute("SELECT count(*) FROM records").fetchone()[0] == records
    db.close()


def test_an_unreadable_cache_database_is_a_clear_error(dockbuild: DockbuildCLI) -> None:
    dockbuild.root.mkdir(parents=True)
    (dockbuild.root / "db.sqlite").write_bytes(b"not a database, " * 512)
    run = dockbuild("du", check=False)
    assert run.returncode == 1
    assert "cache database" in run.stderr and "cannot be read" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_a_build_on_an_unreadable_cache_database_is_the_same_clear_error(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    # The build opens the database early (to hash a `COPY .` context beside the rest);
    # a database it cannot read must still end in the store's message.
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nCOPY . /app\n", "a.txt": "a\n"})
    dockbuild.root.mkdir(parents=True)
    (dockbuild.root / "db.sqlite").write_bytes(b"not a database, " * 512)
    run = dockbuild("--progress=plain", *dockbuild.base_context, str(ctx), check=False)
    assert run.returncode == 1
    assert "cache database" in run.stderr and "cannot be read" in run.stderr, run.stderr
    assert "internal error" not in run.stderr and "Traceback" not in run.stderr


# -- du and prune ------------------------------------------------------------------------


MULTI = """\
FROM busybox AS deps
RUN dd if=/dev/zero of=/deps bs=1k count=300 2>/dev/null
FROM deps AS app
COPY app.txt /app.txt
RUN cat /app.txt > /copy.txt
"""


def test_du_lists_records_with_types_and_its_total_is_the_bytes_on_disk(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": MULTI, "app.txt": "v1\n"})
    dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'a.tar'}", env=EPOCH)
    out = dockbuild("du").out
    assert re.search(r"regular\s+\S+\s+.*RUN dd", out)
    assert re.search(r"regular\s+\S+\s+.*FROM busybox", out)
    total = du_total(dockbuild)
    real = disk_bytes(dockbuild.root)
    assert abs(total - real) <= 0.02 * real + 16384, (total, real)
    assert parse_size(re.search(r"^Database:\s+(\S+)", out, re.M).group(1)) > 0  # type: ignore[union-attr]
    verbose = dockbuild("du", "-v", "--filter", "type==regular", "--filter", "description~=RUN dd").out
    assert verbose.count("ID:") == 1 and "Type:\t\tregular" in verbose
    bad = dockbuild("du", "--filter", "type==nonsense", check=False)
    assert bad.returncode == 1 and "unknown record type" in bad.stderr and "Traceback" not in bad.stderr


def test_prune_of_a_step_keeps_the_layers_later_steps_still_use(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": MULTI, "app.txt": "v1\n"})
    dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'a.tar'}", env=EPOCH)
    pruned = dockbuild("prune", "-f", "-v", "--filter", "description~=RUN dd")
    assert "RUN dd" in pruned.out and "1 records" in pruned.out
    assert dockbuild("debug", "check-cache").out.strip() == "cache OK"
    again = dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'b.tar'}", env=EPOCH)
    # The final step is still a hit: the pruned step's layer stayed for it.
    assert re.search(r"RUN cat /app.txt > /copy.txt\n#\d+ CACHED", again.stderr), again.stderr
    assert oci_manifest_digest(tmp_path / "a.tar") == oci_manifest_digest(tmp_path / "b.tar")


def test_prune_all_empties_the_cache_and_plain_prune_keeps_base_images(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": MULTI, "app.txt": "v1\n"})
    dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path / 'a.tar'}", env=EPOCH)
    refused = dockbuild("prune", check=False)
    assert refused.returncode == 1 and "-f" in refused.stderr
    dockbuild("prune", "-f")
    left = dockbuild("du").out
    assert "FROM busybox" in left and "RUN dd" not in left
    before = disk_bytes(dockbuild.root)
    result = dockbuild("prune", "-f", "--all")
    freed = parse_size(re.search(r"Total:\s+(\S+) reclaimed", result.out).group(1))  # type: ignore[union-attr]
    after = disk_bytes(dockbuild.root)
    assert after < 200_000 and freed >= 0.9 * (before - after) - 16384, (before, after, freed)
    assert not any((dockbuild.root / "snapshots").iterdir())
    assert not any((dockbuild.root / "blobs" / "sha256").iterdir())
    assert "Records:\t0" in dockbuild("du").out


def test_prune_keep_storage_removes_least_recently_used_first(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    old = write_context(tmp_path / "old", {"Dockerfile": "FROM busybox\nRUN dd if=/dev/zero of=/a bs=1k count=400\n"})
    new = write_context(tmp_path / "new", {"Dockerfile": "FROM busybox\nRUN dd if=/dev/zero of=/b bs=1k count=400\n"})
    dockbuild.build(old, "-o", f"type=local,dest={tmp_path / 'o1'}")
    time.sleep(0.05)
    dockbuild.build(new, "-o", f"type=local,dest={tmp_path / 'o2'}")
    size = du_total(dockbuild)
    dockbuild("prune", "-f", "--keep-storage", str(int(size - 200_000)))
    left = dockbuild("du").out
    assert "of=/b" in left and "of=/a" not in left
    kept = dockbuild("prune", "-f", "--keep-duration", "1h")
    assert "(0 records)" in kept.out
    until = dockbuild("prune", "-f", "--filter", "until=1h")
    assert "(0 records)" in until.out


# -- automatic GC -------------------------------------------------------------------------


def test_gc_after_a_build_keeps_the_cache_under_max_used_space_dropping_the_oldest(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[cache]\ngc = true\nmaxUsedSpace = "5MB"\nreservedSpace = "1MB"\n')
    env = {"DOCKBUILD_CONFIG": str(config)}
    for n in range(3):
        ctx = write_context(
            tmp_path / f"c{n}",
            {"Dockerfile": f"FROM busybox\nRUN dd if=/dev/urandom of=/f{n} bs=1k count=1500 2>/dev/null\n"},
        )
        dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / f'o{n}'}", env=env)
        time.sleep(0.05)
    assert du_total(dockbuild) <= 5 * 1024 * 1024
    left = dockbuild("du").out
    assert "of=/f2" in left  # the newest stays
    assert "of=/f0" not in left  # the oldest went first
    off = tmp_path / "off.toml"
    off.write_text("[worker.oci]\ngc = false\n")  # buildkitd.toml's spelling works too
    big = write_context(tmp_path / "big", {"Dockerfile": "FROM busybox\nRUN dd if=/dev/urandom of=/g bs=1k count=6000 2>/dev/null\n"})
    dockbuild.build(big, "-o", f"type=local,dest={tmp_path / 'ob'}", env={"DOCKBUILD_CONFIG": str(off)})
    assert du_total(dockbuild) > 5 * 1024 * 1024


def test_a_bad_gc_config_is_a_warning_not_a_failed_build(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[cache]\nmaxUsedSpace = "lots"\n')
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\n"})
    run = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'o'}", env={"DOCKBUILD_CONFIG": str(config)})
    assert "WARNING: cache garbage collection skipped: invalid maxUsedSpace 'lots'" in run.stderr


# -- --no-cache-filter and --explain-cache ---------------------------------------------------


def test_no_cache_filter_runs_the_named_stage_again_and_what_depends_on_it(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox AS gen\nRUN cat /proc/sys/kernel/random/uuid > /id\n"
            "FROM busybox AS other\nRUN echo other > /other\n"
            "FROM busybox\nCOPY --from=gen /id /id\nCOPY --from=other /other /other\n",
        },
    )
    first = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'a'}")
    assert "DONE" in first.stderr
    second = dockbuild.build(ctx, "--no-cache-filter", "gen", "-o", f"type=local,dest={tmp_path / 'b'}")
    # Plain progress interleaves parallel steps: match each step's end by its number.
    ends = dict(re.findall(r"^#(\d+) (DONE|CACHED)", second.stderr, re.M))
    steps = {name: ends.get(n) for n, name in re.findall(r"^#(\d+) (\[.*)$", second.stderr, re.M)}
    assert [end for name, end in steps.items() if name.startswith("[gen 2/2] RUN")] == ["DONE"], second.stderr
    assert [end for name, end in steps.items() if name.startswith("[other 2/2] RUN")] == ["CACHED"], second.stderr
    # a re-run's new output is used, not the old layer of the same key
    assert (tmp_path / "a" / "id").read_text() != (tmp_path / "b" / "id").read_text()
    dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'c'}")
    assert (tmp_path / "c" / "id").read_text() == (tmp_path / "b" / "id").read_text()
    both = dockbuild.build(ctx, "--no-cache", "--no-cache-filter", "gen", check=False)
    assert both.returncode == 1 and "cannot currently be used together" in both.stderr


def test_no_cache_filter_runs_a_step_the_named_stage_shares_with_another_stage(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    # `a` and `b` make the same step (one op): naming either stage runs it again; the
    # steps of `c`, built on `a`, are `c`'s own and are named by `c` only.
    step = "RUN cat /proc/sys/kernel/random/uuid > /id\n"
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": f"FROM busybox AS a\n{step}FROM busybox AS b\n{step}"
            "FROM a AS c\nRUN cat /proc/sys/kernel/random/uuid > /c\n"
            "FROM busybox\nCOPY --from=b /id /id\nCOPY --from=c /c /c\n",
        },
    )

    def build(name: str, *flags: str) -> tuple[str, str]:
        dockbuild.build(ctx, *flags, "-o", f"type=local,dest={tmp_path / name}")
        return (tmp_path / name / "id").read_text(), (tmp_path / name / "c").read_text()

    first = build("one")
    again = build("two", "--no-cache-filter", "a")
    assert again[0] != first[0]
    by_index = build("three", "--no-cache-filter", "2")  # stage c
    assert by_index[0] == again[0] and by_index[1] != again[1]


def test_no_cache_filter_in_a_one_stage_file_and_an_unknown_name(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN cat /proc/sys/kernel/random/uuid > /id\n"}
    )
    dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'a'}")
    run = dockbuild.build(ctx, "--no-cache-filter", "0,nosuch", "-o", f"type=local,dest={tmp_path / 'b'}")
    assert "WARNING: --no-cache-filter nosuch: no stage of that name" in run.stderr
    assert (tmp_path / "a" / "id").read_text() != (tmp_path / "b" / "id").read_text()


def test_explain_cache_names_the_changed_file_build_arg_and_parent(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox\nARG FLAVOR=plain\nCOPY src/ /src/\nRUN echo $FLAVOR > /flavor\nRUN ls /src > /list\n",
            "src/a.txt": "a\n",
            "src/b.txt": "b\n",
            "notes.md": "unrelated\n",
        },
    )
    dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'o1'}")
    (ctx / "src" / "b.txt").write_text("changed\n")
    (ctx / "src" / "c.txt").write_text("new\n")
    run = dockbuild.build(ctx, "--explain-cache", "--build-arg", "FLAVOR=spicy", "-o", f"type=local,dest={tmp_path / 'o2'}")
    lines = [line for line in run.stderr.splitlines() if line.startswith("explain-cache:")]
    text = "\n".join(lines)
    assert re.search(r"COPY src/ /src/: context files: changed src/b.txt; added src/c.txt", text), text
    assert re.search(r"RUN echo \$FLAVOR > /flavor: .*build args / env changed: FLAVOR", text), text
    assert "spicy" not in text  # names, never values
    assert re.search(r"RUN ls /src > /list: .*parent step changed: \[\d/\d\] RUN echo", text), text
    order = [line.split(": ")[1] for line in lines]
    assert order.index("[2/4] COPY src/ /src/") < order.index("[3/4] RUN echo $FLAVOR > /flavor")
    quiet = dockbuild.build(ctx, "--build-arg", "FLAVOR=spicy", "-o", f"type=local,dest={tmp_path / 'o3'}")
    assert "explain-cache:" not in quiet.stderr
    raw = dockbuild(
        "--progress=rawjson", *dockbuild.base_context, "--explain-cache", "--build-arg", "FLAVOR=mild",
        "-o", f"type=local,dest={tmp_path / 'o4'}", str(ctx),
    )
    messages = [  # log lines of no step
        base64.b64decode(log["data"]).decode()
        for x in raw.stderr.splitlines()
        if x.startswith("{")
        for log in json.loads(x).get("logs", [])
        if "vertex" not in log
    ]
    assert any("build args / env changed: FLAVOR" in m for m in messages), messages
    assert os.path.exists(tmp_path / "o4" / "flavor")


def test_explain_cache_names_a_base_image_whose_tag_moved(
    dockbuild: DockbuildCLI, tmp_path: Path, registry, busybox_layout: Path  # type: ignore[no-untyped-def]
) -> None:
    base = f"{registry.host}/explain/base:latest"
    registry.push_layout(busybox_layout, "explain/base:latest")
    app = write_context(tmp_path / "app", {"Dockerfile": f"FROM {base}\nRUN echo app > /app\n"})
    dockbuild("--progress=plain", "-o", f"type=local,dest={tmp_path / 'o1'}", str(app))
    newer = write_context(tmp_path / "newer", {"Dockerfile": "FROM busybox\nRUN echo newer > /newer\n"})
    dockbuild.build(newer, "-t", base, "--push")  # the tag now names another image
    run = dockbuild("--progress=plain", "--pull", "--explain-cache", "-o", f"type=local,dest={tmp_path / 'o2'}", str(app))
    assert re.search(r"explain-cache: \[2/2\] RUN echo app > /app: base image changed: docker-image://\S+@sha256:\w+ -> docker-image://\S+@sha256:\w+", run.stderr), run.stderr
    assert (tmp_path / "o2" / "newer").exists()
