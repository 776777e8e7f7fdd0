"""Registry mirrors from the config file, through the real CLI and a real registry:
a pull goes to the mirror first, and falls back to the registry when the mirror fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from clitools import DockbuildCLI, write_context


@pytest.fixture(scope="module")
def mirrored(registry, busybox_layout: Path) -> str:  # type: ignore[no-untyped-def]
    registry.push_layout(busybox_layout, "mirrored/busybox:latest")
    return registry.host


def _build(dockbuild: DockbuildCLI, tmp_path: Path, config: str, image: str) -> tuple[int, str, Path]:
    (tmp_path / "config.toml").write_text(config)
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {image}\nRUN echo pulled > /p\n"})
    out = tmp_path / "out"
    run = dockbuild("--progress=plain", "-o", f"type=local,dest={out}", str(ctx),
                    env={"DOCKBUILD_CONFIG": str(tmp_path / "config.toml")}, check=False)
    return run.returncode, run.stderr, out


def test_pull_through_a_mirror(dockbuild: DockbuildCLI, tmp_path: Path, mirrored: str) -> None:
    config = f'[registry."registry.invalid"]\nmirrors = ["{mirrored}"]\n'
    code, err, out = _build(dockbuild, tmp_path, config, "registry.invalid/mirrored/busybox:latest")
    assert code == 0, err  # registry.invalid does not resolve: only the mirror can answer
    assert (out / "p").read_text() == "pulled\n"


def test_a_dead_mirror_falls_back_to_the_registry(dockbuild: DockbuildCLI, tmp_path: Path, mirrored: str) -> None:
    config = f'[registry."{mirrored}"]\nmirrors = ["127.0.0.1:9"]\n'
    code, err, out = _build(dockbuild, tmp_path, config, f"{mirrored}/mirrored/busybox:latest")
    assert code == 0, err
    assert (out / "p").read_text() == "pulled\n"
