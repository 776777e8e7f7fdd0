"""Fixtures and hooks every test area shares."""

from __future__ import annotations

from pathlib import Path

import conformance_data
import pytest

pytest_plugins = ["registry_fixture"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "conformance: reads BuildKit's conformance data; skipped without it, a failure when CI is set",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Without the data: skipped here, or failed by pytest_runtest_call when CI is set.
    missing = item.get_closest_marker("conformance") and not conformance_data.PRESENT
    if missing and not conformance_data.ci_requires_it():
        pytest.skip(conformance_data.MISSING)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    if item.get_closest_marker("conformance") and not conformance_data.PRESENT:
        pytest.fail(f"{conformance_data.MISSING}; required because CI is set", pytrace=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Shown whatever -r says: a clone without the data must see why tests were skipped.
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if conformance_data.MISSING in str(getattr(report, "longrepr", ""))
    ]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} conformance tests skipped: {conformance_data.MISSING}", yellow=True
        )


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh dockbuild cache root for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DOCKBUILD_ROOT", str(root))
    return root
