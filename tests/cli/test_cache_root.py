"""A cache root that cannot be made or written is the user's environment, not a bug of
ours: one clear error naming the path and the fix, through the real command."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from clitools import DockbuildCLI, Run, write_context


def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")


@contextmanager
def _mounted(path: Path, *mount_args: str) -> Iterator[Path]:
    """``mount *mount_args path`` for the duration; root only."""
    _root_only()
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", *mount_args, str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def _clear_error(run: Run) -> None:
    assert run.returncode == 1, run.stderr
    assert "internal error" not in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    return write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nCOPY Dockerfile /\n"})


def test_a_read_only_home_names_the_cache_path_and_the_variables_that_move_it(
    dockbuild: DockbuildCLI, ctx: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o555)
    # Root ignores permission bits: a read-only bind mount makes the 0555 HOME what it is
    # for a CI user.
    with _mounted(home, "--bind", str(home)):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(home)], check=True)
        env = {"HOME": str(home), "DOCKBUILD_ROOT": "", "XDG_CACHE_HOME": ""}
        for args in (["--progress=plain", *dockbuild.base_context, str(ctx)], ["du"], ["prune", "-f"]):
            run = dockbuild(*args, env=env, check=False)
            _clear_error(run)
            assert f"cannot write the cache at {home}/.cache/dockbuild" in run.stderr
            assert "Read-only file system" in run.stderr
            assert "DOCKBUILD_ROOT" in run.stderr and "XDG_CACHE_HOME" in run.stderr


def test_a_file_as_dockbuild_root_says_it_is_not_a_directory(
    dockbuild: DockbuildCLI, ctx: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("keep me")
    for root in (blocker, blocker / "cache"):
        run = dockbuild("--progress=plain", *dockbuild.base_context, str(ctx),
                        "-o", f"type=local,dest={tmp_path / 'out'}",
                        env={"DOCKBUILD_ROOT": str(root)}, check=False)  # fmt: skip
        _clear_error(run)
        assert f"cannot use {root} as the cache: {blocker} is not a directory" in run.stderr
        assert "DOCKBUILD_ROOT" in run.stderr
    assert blocker.read_text() == "keep me"


def test_a_full_cache_disk_says_so_and_how_to_make_room(
    dockbuild: DockbuildCLI, ctx: Path, tmp_path: Path
) -> None:
    with _mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=200k", "tmpfs") as small:
        run = dockbuild("--progress=plain", *dockbuild.base_context, str(ctx),
                        "-o", f"type=local,dest={tmp_path / 'out'}",
                        env={"DOCKBUILD_ROOT": str(small)}, check=False)  # fmt: skip
        _clear_error(run)
        assert "no space left on device" in run.stderr
        assert "free space" in run.stderr and str(small) in run.stderr
    assert not (tmp_path / "out").exists()


def test_a_cache_root_that_became_read_only_is_named_not_called_unreadable(
    dockbuild: DockbuildCLI, ctx: Path, tmp_path: Path
) -> None:
    dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'first'}")  # the cache exists
    with _mounted(dockbuild.root, "--bind", str(dockbuild.root)):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(dockbuild.root)], check=True)
        for args in (["--progress=plain", *dockbuild.base_context, str(ctx)], ["du"]):
            run = dockbuild(*args, check=False)
            _clear_error(run)
            assert f"cannot write the cache at {dockbuild.root}: Read-only file system" in run.stderr
            assert "cannot be read" not in run.stderr and "DOCKBUILD_ROOT" in run.stderr
