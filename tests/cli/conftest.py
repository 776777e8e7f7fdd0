"""Fixtures for end-to-end tests of the real command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from clitools import REPO, DockbuildCLI


@pytest.fixture
def dockbuild(tmp_path: Path, busybox_layout: Path) -> DockbuildCLI:
    return DockbuildCLI(tmp_path / "cache", busybox_layout)


@pytest.fixture
def hello(tmp_path: Path) -> Path:
    """A private copy of examples/hello, free to edit."""
    dest = tmp_path / "hello"
    shutil.copytree(REPO / "examples" / "hello", dest, symlinks=True)
    return dest


@pytest.fixture(params=["namespace", "runc"])
def executor(request: pytest.FixtureRequest) -> str:
    """The same behaviour from the built-in executor and from runc."""
    if request.param == "runc" and shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    return request.param


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # The container matrix (test_container_matrix.py): each cell's build time and digest.
    import sys

    matrix = sys.modules.get("test_container_matrix")
    lines = matrix.matrix_lines() if matrix is not None else []
    if lines:
        terminalreporter.section("container matrix")
        for line in lines:
            terminalreporter.write_line(line)
