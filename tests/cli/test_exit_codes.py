"""Exit statuses a script can act on, through the real command (the table in docs/cli.md)."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest
from clitools import DOCKBUILD, DockbuildCLI, write_context
from registry_fixture import Registry


def test_success_exits_0(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\n"})
    assert dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'out'}").returncode == 0


def test_a_failed_step_and_a_dockerfile_error_exit_1(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    for dockerfile, message in [
        ("FROM busybox\nRUN exit 7\n", "exit code: 7"),
        ("FROM busybox\nCOPY\n", "Dockerfile:2"),
        ("FROM busybox\nCOPY missing.txt /\n", "missing.txt"),
    ]:
        ctx = write_context(tmp_path / "ctx", {"Dockerfile": dockerfile})
        run = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'out'}", check=False)
        assert run.returncode == 1, run.stderr
        assert message in run.stderr and "Traceback" not in run.stderr


def test_a_usage_error_exits_2(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\n"})
    for args in (["--bogus"], ["--network", "bridge"], ["-o", "type=floppy"], ["--sbom=true"]):
        run = dockbuild.build(ctx, *args, check=False)
        assert run.returncode == 2, (args, run.stderr)


def test_a_registry_refusing_the_credentials_exits_3(
    dockbuild: DockbuildCLI, registry_with_auth: Registry, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {registry_with_auth.host}/private/base:1\n"})
    empty = tmp_path / "docker-config"
    empty.mkdir()
    run = dockbuild("--progress=plain", str(ctx), "-o", f"type=local,dest={tmp_path / 'out'}",
                    env={"DOCKER_CONFIG": str(empty)}, check=False)  # fmt: skip
    assert run.returncode == 3, run.stderr
    assert "unauthorized" in run.stderr and "Traceback" not in run.stderr


def test_an_unreachable_registry_exits_3(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM 127.0.0.1:{port}/nothing/here:1\n"})
    run = dockbuild("--progress=plain", str(ctx), "-o", f"type=local,dest={tmp_path / 'out'}", check=False)
    assert run.returncode == 3, run.stderr
    assert f"cannot reach registry 127.0.0.1:{port}" in run.stderr


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_build_stopped_by_a_signal_exits_128_plus_its_number(
    dockbuild: DockbuildCLI, tmp_path: Path, signum: int, status: int
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN echo started && sleep 60\n"})
    proc = subprocess.Popen(
        [DOCKBUILD, "--progress=plain", *dockbuild.base_context, str(ctx), "-o", f"type=local,dest={tmp_path / 'out'}"],
        env=dockbuild.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # wait until the step runs
            seen.append(line)
            if line.rstrip().endswith(" started"):
                break
        else:
            pytest.fail("the RUN step never started:\n" + "".join(seen))
        proc.send_signal(signum)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == status, rest
        assert "ERROR: interrupted" in rest and "Traceback" not in rest
        assert not (tmp_path / "out").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
