"""Failure figures, in small counts: bench/chaos.py's scenarios (the bench runs 50 kills).

Builds killed with SIGKILL, a cache root on a full tmpfs, concurrent builds on one cache
root, and builds stopped by SIGINT/SIGTERM mid-RUN: the cache stays consistent, nothing
is left behind, and the digests are those of undisturbed builds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from clitools import REPO, DockbuildCLI
from registry_fixture import Registry


def _load_chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaos", REPO / "bench" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the scenarios mount a tmpfs and read /proc as root")


@pytest.fixture
def scene(tmp_path: Path, busybox_layout: Path) -> Any:
    return chaos.Chaos(tmp_path / "cache", tmp_path, busybox_layout)


def test_builds_killed_at_random_moments_leave_a_cache_the_next_build_trusts(
    scene: Any, registry: Registry
) -> None:
    row = chaos.kills(scene, 3, random.Random(19), push=f"{registry.host}/chaos/app:1")
    assert (row.runs, row.ok, row.notes) == (3, 3, [])


def test_a_killed_build_leaves_a_record_leftover_that_check_cache_names_and_the_next_build_removes(
    scene: Any, tmp_path: Path
) -> None:
    ctx = scene.context("slow", f"FROM busybox\nENV {chaos.MARKER}\nRUN echo started && sleep 300\n")
    proc = subprocess.Popen(scene.command(ctx, tmp_path / "o.tar"), env=scene.env(), stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.rstrip().endswith(" started"):
            break
    assert scene.left_behind()  # the check sees a running build
    proc.kill()
    proc.wait()
    proc.stderr.close()
    assert chaos.wait_gone(scene) == []
    report = scene.check_cache()
    assert report is not None and "build record leftover" in report
    ok = scene.context("ok", "FROM busybox\nRUN true\n")
    assert scene.build(ok, tmp_path / "ok.tar").returncode == 0
    assert scene.check_cache() is None


def test_a_full_cache_disk_is_a_clear_error_naming_the_cache_root_and_prune(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    subprocess.run(["umount", str(probe)], check=True)
    row = chaos.full_disk(tmp_path)
    assert (row.runs, row.ok, row.notes) == (1, 1, [])


def test_concurrent_overlapping_builds_on_one_cache_root_all_succeed_with_identical_digests(
    scene: Any,
) -> None:
    row = chaos.concurrent(scene, 6)
    assert (row.runs, row.ok, row.notes) == (6, 6, [])


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_build_stopped_mid_run_leaves_nothing_behind_and_a_canceled_record(
    scene: Any, dockbuild: DockbuildCLI, signum: int, status: int
) -> None:
    exit_status, _took, left = chaos.stop_with(scene, signum)
    assert exit_status == status
    assert left == []
    assert scene.check_cache() is None
    dockbuild.root = scene.root
    (record,) = [json.loads(line) for line in dockbuild("history", "ls", "--format", "json").out.splitlines()]
    assert record["status"] == "canceled"
    logs = dockbuild("history", "logs").out
    assert "#2 " in logs and " started" in logs
