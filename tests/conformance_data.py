"""Where BuildKit's conformance data lives, which a fresh clone does not have.

The data sits in the shared folder beside the clone (``../shared``) or at
``$DOCKBUILD_SHARED``; this is the one place tests find it. Tests that read it carry the
``conformance`` mark: tests/conftest.py skips them with a reason when the data is
missing, and fails them when ``CI`` is set. A module of its own, not `conftest`:
`from conftest import ...` picks whichever conftest.py pytest imported first when several
test folders have one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DOCKBUILD_SHARED") or REPO.parent / "shared")
BUILDKIT_DATA = SHARED / "conformance" / "buildkit"
PRESENT = BUILDKIT_DATA.is_dir()
MISSING = (
    f"BuildKit's conformance data is not at {BUILDKIT_DATA}"
    " (set DOCKBUILD_SHARED to the folder holding conformance/)"
)

conformance = pytest.mark.conformance
"""The mark of a test that reads BUILDKIT_DATA."""


def ci_requires_it() -> bool:
    """Under CI (``CI`` set, as CI services set it) the data is required, not optional."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")
