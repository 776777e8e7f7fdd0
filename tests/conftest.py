"""Fixtures every test area shares."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest_plugins = ["registry_fixture"]


def shared_dir() -> Path:
    """The project's shared/ folder: beside the clone, or $DOCKBUILD_SHARED."""
    return Path(os.environ.get("DOCKBUILD_SHARED", REPO.parent / "shared"))


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh dockbuild cache root for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DOCKBUILD_ROOT", str(root))
    return root
