"""Where BuildKit's conformance data lives (the project's shared/ folder).

A module of its own, not `conftest`: `from conftest import ...` picks whichever
conftest.py pytest imported first when several test folders have one.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """The project's shared/ folder: beside the clone, or $DOCKBUILD_SHARED."""
    return Path(os.environ.get("DOCKBUILD_SHARED", REPO.parent / "shared"))


BUILDKIT_DATA = shared_dir() / "conformance" / "buildkit"
