"""Progress: a sequence of step events as each renderer shows it."""

from __future__ import annotations

import io
import json
import re

import pytest

from dockbuild.errors import DockbuildError
from dockbuild.progress import (
    PlainRenderer,
    Progress,
    QuietRenderer,
    RawJSONRenderer,
    TtyRenderer,
    make_progress,
)


def a_build(progress: Progress) -> None:
    """Three steps (done with output, cached, failed) and a message."""
    run = progress.vertex("[1/3] RUN make")
    run.log("stdout", b"compiling\nlink")
    run.log("stdout", b"ing\n")
    run.log("stderr", b"a warning without a newline")
    run.done()
    run.done()  # a step ends once
    progress.vertex("[2/3] COPY . /src").cached()
    failed = progress.vertex("[3/3] RUN make test")
    failed.error("exit code: 2")
    progress.message("WARNING: something to know")
    progress.close()


def test_plain_prints_buildkits_numbered_lines() -> None:
    out = io.StringIO()
    a_build(Progress(PlainRenderer(out)))
    expected = [
        "",
        r"#1 \[1/3\] RUN make",
        r"#1 \d+\.\d{3} compiling",
        r"#1 \d+\.\d{3} linking",
        r"#1 \d+\.\d{3} a warning without a newline",  # flushed when the step ends
        r"#1 DONE \d+\.\ds",
        "",
        r"#2 \[2/3\] COPY \. /src",
        "#2 CACHED",
        "",
        r"#3 \[3/3\] RUN make test",
        "#3 ERROR: exit code: 2",
        "WARNING: something to know",
    ]
    lines = out.getvalue().splitlines()
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)


def test_rawjson_prints_one_event_a_line() -> None:
    out = io.StringIO()
    a_build(Progress(RawJSONRenderer(out)))
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e.get("vertex")) for e in events] == [
        ("start", 1),
        ("log", 1),
        ("log", 1),
        ("log", 1),
        ("done", 1),
        ("start", 2),
        ("cached", 2),
        ("start", 3),
        ("error", 3),
        ("message", None),
    ]
    logs = [(e["stream"], e["text"]) for e in events if e["event"] == "log"]
    assert logs == [
        ("stdout", "compiling"),
        ("stdout", "linking"),
        ("stderr", "a warning without a newline"),
    ]
    assert events[0]["name"] == "[1/3] RUN make" and isinstance(events[0]["time"], float)
    assert all(e["duration"] >= 0 for e in events if e["event"] in ("done", "cached", "error"))
    assert events[8]["message"] == "exit code: 2"
    assert events[9] == {"event": "message", "text": "WARNING: something to know"}


def test_quiet_prints_only_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(QuietRenderer())
    a_build(progress)
    progress.message("a note")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "WARNING: something to know\n"


def test_tty_shows_each_step_with_its_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    # Rendered to a captured stderr (not a terminal): the final view, once.
    a_build(Progress(TtyRenderer()))
    err = capsys.readouterr().err
    assert re.search(r"=> \[1/3\] RUN make +\d+\.\ds", err), err
    assert re.search(r"=> \[2/3\] COPY \. /src +CACHED", err), err
    assert re.search(r"=> \[3/3\] RUN make test +ERROR", err), err
    assert "WARNING: something to know" in err
    assert "compiling" not in err  # a finished step's log is not kept on screen


def test_auto_is_plain_off_a_terminal_and_an_unknown_mode_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = make_progress("auto")
    progress.vertex("step").done()
    progress.close()
    assert capsys.readouterr().err.splitlines()[:2] == ["", "#1 step"]
    with pytest.raises(DockbuildError, match="unknown progress mode 'fancy'") as refused:
        make_progress("fancy")
    assert refused.value.hint == "use auto, plain, tty, rawjson or quiet"
