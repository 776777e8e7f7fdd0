"""BuildKit's own parser test data: every Dockerfile dumps to its `result`, every negative fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from conformance_data import BUILDKIT_DATA, conformance

from dockbuild.errors import DockerfileError
from dockbuild.frontend.parser import dump, parse
from dockbuild.frontend.stages import parse_stages

DATA = BUILDKIT_DATA
pytestmark = conformance


def _cases(folder: str) -> list[Path]:
    root = DATA / folder
    if not root.is_dir():
        return []
    return sorted(path for path in root.iterdir() if path.is_dir())


POSITIVE = _cases("parser-testfiles")
NEGATIVE = _cases("parser-testfiles-negative")


def test_conformance_data_is_present() -> None:
    assert len(POSITIVE) >= 33, f"expected BuildKit's parser cases under {DATA}"
    assert len(NEGATIVE) >= 4


@pytest.mark.parametrize("case", POSITIVE, ids=[case.name for case in POSITIVE])
def test_dump_matches_buildkit_result(case: Path) -> None:
    result = parse((case / "Dockerfile").read_bytes())

    assert dump(result) + "\n" == (case / "result").read_text(encoding="utf-8")


@pytest.mark.parametrize("case", NEGATIVE, ids=[case.name for case in NEGATIVE])
def test_negative_case_is_rejected(case: Path) -> None:
    with pytest.raises(DockerfileError) as caught:
        parse_stages(parse((case / "Dockerfile").read_bytes()))

    assert caught.value.location is not None
