"""A FROM or --from name that is neither a stage nor an image that resolves: the error
names the Dockerfile line, a close stage name and, when no registry answers, the ways to
build without one. Registries are on loopback only."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from clitools import DockbuildCLI, write_context


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: a connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_a_from_name_close_to_a_stage_name_is_suggested_at_its_line(
    dockbuild: DockbuildCLI, tmp_path: Path, closed_port: int
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox AS build\nRUN echo hi > /x\nFROM busybox\nCOPY --from=builder /x /x\n"
        },
    )
    # `builder` is looked up on docker.io: through a proxy that refuses, so nothing leaves
    # the machine and no registry can be reached.
    proxy = f"http://127.0.0.1:{closed_port}"
    run = dockbuild.build(
        ctx, env={"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "NO_PROXY": ""}, check=False
    )
    assert run.returncode != 0
    assert "Dockerfile:4\n" in run.stderr, run.stderr
    assert ">>> COPY --from=builder /x /x" in run.stderr
    error = next(line for line in run.stderr.splitlines() if line.startswith("ERROR:"))
    assert '"builder" is not a stage (did you mean build?)' in error, error
    assert "docker.io/library/builder:latest" in error
    hint = next(line for line in run.stderr.splitlines() if line.startswith("hint:"))
    assert "--build-context builder=" in hint and "config.toml" in hint, hint
    assert "Traceback" not in run.stderr


def test_an_unreachable_registry_hints_at_build_contexts_and_mirrors(
    dockbuild: DockbuildCLI, tmp_path: Path, closed_port: int
) -> None:
    image = f"127.0.0.1:{closed_port}/app:1"
    ctx = write_context(
        tmp_path / "ctx", {"Dockerfile": f"FROM busybox AS build\n\nFROM {image}\n"}
    )
    run = dockbuild.build(ctx, check=False)
    assert run.returncode != 0
    assert "Dockerfile:3\n" in run.stderr, run.stderr
    assert (
        f"ERROR: FROM {image}: {image}: cannot reach registry 127.0.0.1:{closed_port}" in run.stderr
    )
    assert "did you mean" not in run.stderr  # no stage name is close
    assert (
        f"hint: to build without reaching a registry, pass --build-context {image}=" in run.stderr
    )
    assert "mirror in config.toml" in run.stderr


def test_manifest_unknown_names_the_reference_and_the_line(
    dockbuild: DockbuildCLI,
    tmp_path: Path,
    registry,
    busybox_layout: Path,  # type: ignore[no-untyped-def]
) -> None:
    registry.push_layout(busybox_layout, "names/busybox:1")
    missing = f"{registry.host}/names/busybox:nope"
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": f"FROM {registry.host}/names/busybox:1\nRUN true\nCOPY --from={missing} /x /x\n"
        },
    )
    run = dockbuild.build(ctx, check=False)
    assert run.returncode != 0
    assert "Dockerfile:3\n" in run.stderr, run.stderr
    assert f"ERROR: --from={missing}: {missing}: manifest unknown" in run.stderr
    from_line = write_context(tmp_path / "ctx2", {"Dockerfile": f"# base\nFROM {missing}\n"})
    run = dockbuild.build(from_line, check=False)
    assert "Dockerfile:2\n" in run.stderr, run.stderr
    assert f"ERROR: FROM {missing}: {missing}: manifest unknown" in run.stderr
    assert "hint: to build without" not in run.stderr  # the registry answered
