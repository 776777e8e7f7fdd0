"""Build records: whole logs with flat memory, `dockbuild history`, rawjson read back."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

from clitools import DOCKBUILD, DockbuildCLI, write_context

# 50,000 numbered lines of 1,000 characters: 50 MB.
BIG_LINES = 50_000
BIG_RUN = (
    "RUN awk 'BEGIN{s=sprintf(\"%995s\",\"\");gsub(/ /,\"x\",s);"
    f"for(i=0;i<{BIG_LINES};i++)printf \"%04x %s\\n\", i, s}}'"
)


def _peak_rss_kib(dockbuild: DockbuildCLI, args: list[str], stderr: Path) -> tuple[int, int]:
    """Run dockbuild under a fresh Python that reports the largest RSS of its children
    (getrusage: the dockbuild processes and the step's, whichever peaked)."""
    probe = (
        "import resource, subprocess, sys\n"
        "with open(sys.argv[1], 'wb') as err:\n"
        "    rc = subprocess.run(sys.argv[2:], stderr=err, stdout=subprocess.DEVNULL).returncode\n"
        "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(stderr), DOCKBUILD, *args],
        env=dockbuild.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout.split()
    return int(out[0]), int(out[1])


def test_a_step_printing_50_mb_is_shown_whole_in_plain_and_kept_whole_in_memory_that_stays_flat(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    small = write_context(tmp_path / "small", {"Dockerfile": "FROM busybox\nRUN echo small\n"})
    big = write_context(tmp_path / "big", {"Dockerfile": f"FROM busybox\n{BIG_RUN}\n"})
    base = ["build", "--progress=plain", *dockbuild.base_context]
    rc, baseline = _peak_rss_kib(dockbuild, [*base, str(small)], tmp_path / "small.err")
    assert rc == 0
    rc, peak = _peak_rss_kib(dockbuild, [*base, str(big)], tmp_path / "big.err")
    assert rc == 0, (tmp_path / "big.err").read_text()[-2000:]
    # Held in memory, 50 MB of lines would add far more than 40 MB.
    assert peak - baseline < 40 * 1024, (baseline, peak)
    print(f"peak RSS: {baseline} KiB (small log), {peak} KiB (50 MB log)")
    shown = [line for line in (tmp_path / "big.err").read_text().splitlines() if line.startswith("#3 ")]
    assert shown[0].startswith("#3 [2/2] RUN awk")
    logged = [line.split(" ", 3)[2] for line in shown[1:-1]]
    assert len(logged) == BIG_LINES and logged[-1] == f"{BIG_LINES - 1:04x}", shown[-2][:40]
    assert all(len(line.split(" ", 2)[2]) == 1000 for line in shown[1:-1])
    assert shown[-1].startswith("#3 DONE")
    # The record keeps it whole too, and prints it in the same format.
    logs = dockbuild("history", "logs", "--step", "3").out.splitlines()
    assert logs[-2].split(" ", 2)[2].startswith(f"{BIG_LINES - 1:04x} ") and logs[-1].startswith("#3 DONE")
    assert sum(1 for line in logs if line.startswith("#3 ") and "xxxx" in line) == BIG_LINES


def test_rawjson_is_buildkits_solve_status_with_the_whole_log_in_base64(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {"Dockerfile": "FROM busybox\nRUN seq 1 20000; echo oops >&2\nRUN true\n"},
    )
    run = dockbuild("--progress=rawjson", *dockbuild.base_context, str(ctx), "-o", f"type=oci,dest={tmp_path / 'o.tar'}")
    statuses = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    assert statuses and all(set(s) <= {"vertexes", "statuses", "logs", "warnings"} for s in statuses)
    vertexes = [v for s in statuses for v in s.get("vertexes", [])]
    names = {v["digest"]: v["name"] for v in vertexes}
    assert all(v["digest"].startswith("sha256:") and "started" in v for v in vertexes)
    run_digest = next(d for d, n in names.items() if n.startswith("[2/3] RUN seq"))
    finished = [v for v in vertexes if v["digest"] == run_digest and "completed" in v]
    assert finished and not finished[-1].get("error") and not finished[-1].get("cached")
    logs = [entry for s in statuses for entry in s.get("logs", []) if entry["vertex"] == run_digest]
    stdout = b"".join(base64.b64decode(e["data"]) for e in logs if e["stream"] == 1)
    stderr = b"".join(base64.b64decode(e["data"]) for e in logs if e["stream"] == 2)
    assert stdout == b"".join(b"%d\n" % i for i in range(1, 20001))
    assert stderr == b"oops\n"
    assert all(e["timestamp"].endswith("Z") for e in logs)
    # Built again: the steps say cached.
    again = dockbuild("--progress=rawjson", *dockbuild.base_context, str(ctx), "-o", f"type=oci,dest={tmp_path / 'o.tar'}")
    cached = [v for line in again.stderr.splitlines() if line.startswith("{") for v in json.loads(line).get("vertexes", [])]
    assert any(v.get("cached") and v["name"].startswith("[2/3] RUN seq") for v in cached)


def test_history_lists_inspects_prints_exports_and_removes_build_records(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "app",
        {"Dockerfile": "FROM busybox AS base\nARG GREETING\nRUN echo $GREETING from the step\nFROM base AS final\nRUN true\n"},
    )
    out = tmp_path / "o.tar"
    dockbuild.build(ctx, "--build-arg", "GREETING=hi", "--target", "final", "-o", f"type=oci,dest={out}")
    dockbuild.build(ctx, "--build-arg", "GREETING=hi", "--target", "final", "-o", f"type=oci,dest={out}")
    ctx.joinpath("Dockerfile").write_text("FROM busybox\nRUN echo about to fail; exit 3\n")
    failed = dockbuild.build(ctx, check=False)
    assert failed.returncode == 1

    listed = [json.loads(line) for line in dockbuild("history", "ls", "--format", "json").out.splitlines()]
    assert [r["status"] for r in listed] == ["error", "completed", "completed"]  # the newest first
    failed_id, cached_id, first_id = (r["id"] for r in listed)
    assert f"dockbuild history logs {failed_id} --step 3" in failed.stderr  # the pointer to the whole log
    assert listed[1]["cached"] > listed[2]["cached"] and listed[1]["name"] == "app (final)"
    table = dockbuild("history", "ls").out.splitlines()
    assert table[0].split() == ["BUILD", "ID", "NAME", "STATUS", "CREATED", "AT", "DURATION", "CACHED"]
    assert table[1].startswith(failed_id) and " error " in table[1]
    only_ok = dockbuild("history", "ls", "--format", "json", "--filter", "status=completed").out.splitlines()
    assert {json.loads(line)["id"] for line in only_ok} == {cached_id, first_id}

    inspected = json.loads(dockbuild("history", "inspect", "^2", "--format", "json").out)
    assert inspected["id"] == first_id and inspected["target"] == "final"
    assert inspected["build_args"] == {"GREETING": "hi"} and inspected["platform"] == "linux/amd64"
    assert inspected["outputs"][0]["type"] == "oci" and inspected["outputs"][0]["digest"].startswith("sha256:")
    assert [s["status"] for s in inspected["steps"]][-1] == "done" and all("duration" in s for s in inspected["steps"])
    assert "ARG GREETING" in inspected["dockerfile_text"]
    pretty = dockbuild("history", "inspect", cached_id[:8]).out
    assert "Target:         final" in pretty and "CACHED" in pretty and "GREETING=hi" in pretty
    assert "exit code: 3" in dockbuild("history", "inspect").out  # the newest: the failure

    logs = dockbuild("history", "logs", first_id).out
    assert "hi from the step" in logs and "#1 [internal] load build definition" in logs
    assert "about to fail" in dockbuild("history", "logs", "--step", "3").out
    missing = dockbuild("history", "logs", "--step", "99", check=False)
    assert missing.returncode == 1 and "no step 99" in missing.stderr

    tarball = tmp_path / "record.tgz"
    dockbuild("history", "export", failed_id, "-o", str(tarball))
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        record = json.load(tar.extractfile(f"{failed_id}/record.json"))  # type: ignore[arg-type]
    assert f"{failed_id}/logs/3" in names and record["status"] == "error"
    piped = dockbuild("history", "export", "^1")
    with tarfile.open(fileobj=io.BytesIO(piped.stdout)) as tar:
        assert tar.getnames()[0] == cached_id

    dockbuild("history", "rm", failed_id)
    assert json.loads(dockbuild("history", "ls", "--format", "json").out.splitlines()[0])["id"] == cached_id
    gone = dockbuild("history", "inspect", failed_id, check=False)
    assert gone.returncode == 1 and "no build record" in gone.stderr and "Traceback" not in gone.stderr
    dockbuild("history", "rm", "--all")
    assert dockbuild("history", "ls", "--format", "json").out == ""


def test_history_keeps_as_many_records_as_config_toml_says(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[history]\nkeep = 2\nkeepDuration = \"1h\"\n")
    env = {"DOCKBUILD_CONFIG": str(config)}
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN true\n"})
    for _ in range(4):
        dockbuild.build(ctx, env=env)
    assert len(dockbuild("history", "ls", "--format", "json", env=env).out.splitlines()) == 2
    assert len(list((dockbuild.root / "history").iterdir())) == 2


def test_concurrent_builds_each_write_a_whole_record(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nARG N\nRUN echo build $N\n"})
    results: list[int] = []

    def one(n: int) -> None:
        results.append(dockbuild.build(ctx, "--build-arg", f"N={n}", check=False).returncode)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0, 0, 0, 0]
    listed = [json.loads(line) for line in dockbuild("history", "ls", "--format", "json").out.splitlines()]
    assert len(listed) == 4 and {r["status"] for r in listed} == {"completed"}
    for r in listed:
        n = json.loads(dockbuild("history", "inspect", r["id"], "--format", "json").out)["build_args"]["N"]
        assert f"build {n}" in dockbuild("history", "logs", r["id"]).out
    assert not [p.name for p in (dockbuild.root / "history").iterdir() if p.name.startswith(".")]


def test_history_loads_nothing_of_the_engine_the_frontend_or_rich(dockbuild: DockbuildCLI) -> None:
    shown = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dockbuild", "history", "ls"],
        env=dockbuild.env(),
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = {line.rsplit("|", 1)[-1].strip() for line in shown.stderr.splitlines() if "|" in line}
    heavy = {"rich", "sqlite3", "requests", "zstandard", "dockbuild.engine.store", "dockbuild.frontend"}
    assert "dockbuild.history" in loaded and not loaded & heavy, sorted(loaded & heavy)
