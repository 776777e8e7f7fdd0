"""Progress: a sequence of step events as each renderer shows it."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from rich.console import Console

from dockbuild.errors import DockbuildError
from dockbuild.progress import (
    MAX_LINE,
    PlainRenderer,
    Progress,
    QuietRenderer,
    RawJSONRenderer,
    TtyRenderer,
    make_progress,
    parse_colors,
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


def test_rawjson_prints_buildkits_solve_status_one_a_line() -> None:
    out = io.StringIO()
    a_build(Progress(RawJSONRenderer(out)))
    statuses = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all(len(s) == 1 and set(s) <= {"vertexes", "statuses", "logs", "warnings"} for s in statuses)
    vertexes = [v for s in statuses for v in s.get("vertexes", [])]
    names = {v["digest"]: v["name"] for v in vertexes}
    assert list(names.values()) == ["[1/3] RUN make", "[2/3] COPY . /src", "[3/3] RUN make test"]
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", d) for d in names)
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z"
    assert all(re.fullmatch(stamp, v["started"]) for v in vertexes)
    ends = [v for v in vertexes if "completed" in v]
    assert [(names[v["digest"]], v.get("cached", False), v.get("error", "")) for v in ends] == [
        ("[1/3] RUN make", False, ""),
        ("[2/3] COPY . /src", True, ""),
        ("[3/3] RUN make test", False, "exit code: 2"),
    ]
    logs = [entry for s in statuses for entry in s.get("logs", [])]
    assert [(names[e["vertex"]], e["stream"], base64.b64decode(e["data"])) for e in logs] == [
        ("[1/3] RUN make", 1, b"compiling\n"),
        ("[1/3] RUN make", 1, b"linking\n"),
        ("[1/3] RUN make", 2, b"a warning without a newline\n"),
    ]
    assert all(re.fullmatch(stamp, e["timestamp"]) for e in logs)
    (warning,) = [w for s in statuses for w in s.get("warnings", [])]
    assert "vertex" not in warning
    assert warning["level"] == 1 and base64.b64decode(warning["short"]) == b"WARNING: something to know"


def test_rawjson_writes_a_message_that_is_no_warning_as_a_log_line_of_no_step() -> None:
    out = io.StringIO()
    Progress(RawJSONRenderer(out)).message("explain-cache: [2/2] RUN x: parent step changed")
    (status,) = [json.loads(line) for line in out.getvalue().splitlines()]
    (log,) = status["logs"]
    assert "vertex" not in log and log["stream"] == 2
    assert base64.b64decode(log["data"]) == b"explain-cache: [2/2] RUN x: parent step changed\n"


def test_a_line_without_end_is_passed_on_in_pieces_never_buffered_whole() -> None:
    out = io.StringIO()
    progress = Progress(PlainRenderer(out))
    step = progress.vertex("RUN yes | tr -d newline")
    for _ in range(10):
        step.log("stdout", b"y" * 20_000)
    assert len(step._partial["stdout"]) <= MAX_LINE
    step.done()
    text = "".join(line.split(" ", 2)[2] for line in out.getvalue().splitlines() if line.startswith("#1 0"))
    assert text == "y" * 200_000


def test_quiet_prints_only_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(QuietRenderer())
    a_build(progress)
    progress.message("a note")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "WARNING: something to know\n"


def _console(width: int = 100, **kwargs: object) -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=width, **kwargs)  # type: ignore[arg-type]


def _text(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_tty_shows_each_step_as_buildkit_does_then_the_warnings_and_a_summary() -> None:
    console = _console(no_color=True)
    a_build(Progress(TtyRenderer(console)))
    out = _text(console)
    final = out[out.rindex("[+] Building") :]  # the last frame, then what close() prints
    assert re.search(r"\[\+\] Building \d+\.\ds \(3/3\)", final)
    assert re.search(r" => \[1/3\] RUN make +\d+\.\ds", final), final
    assert re.search(r" => CACHED \[2/3\] COPY \. /src +\d+\.\ds", final), final
    assert re.search(r" => ERROR \[3/3\] RUN make test +\d+\.\ds", final), final
    assert "compiling" not in final  # a finished step's log is not kept on screen
    assert re.search(r" 1 warning found:\n - something to know\n", final), final
    assert re.search(r"\n3 steps, 1 cached, \d+\.\ds\n$", final), final
    assert "\x1b[3" not in out  # no colour


def test_tty_shows_the_last_lines_of_every_running_step_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUILDKIT_TTY_LOG_LINES", "3")
    console = _console()
    renderer = TtyRenderer(console)
    progress = Progress(renderer)
    a = progress.vertex("[a 2/2] RUN build-a")
    b = progress.vertex("[b 2/2] RUN build-b")
    a.log("stdout", b"".join(b"a line %d\n" % i for i in range(10)))
    b.log("stdout", b"b line 1\nb line 2\n")
    view = Console(file=io.StringIO(), width=100, color_system=None)
    view.print(renderer.view())
    screen = _text(view).splitlines()
    assert screen[1].startswith(" => [a 2/2] RUN build-a")
    assert [line.strip() for line in screen[2:5]] == ["=> => # a line 7", "=> => # a line 8", "=> => # a line 9"]
    assert screen[5].startswith(" => [b 2/2] RUN build-b")
    assert [line.strip() for line in screen[6:8]] == ["=> => # b line 1", "=> => # b line 2"]
    a.done()
    b.cached()
    progress.wrote("oci out.tar")
    progress.close()
    assert re.search(r"2 steps, 1 cached, \d+\.\ds, wrote oci out\.tar", _text(console))


def test_tty_colours_follow_buildkit_colors_and_no_color_turns_them_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_colors("run=123,20,245:error=yellow:cancel=blue:warning=white:bogus=1") == {
        "run": "rgb(123,20,245)", "error": "yellow", "cancel": "blue", "warning": "white",
    }  # fmt: skip
    assert parse_colors("run=300,1,1:error=")["run"] == "blue"  # unreadable: the default
    monkeypatch.setenv("BUILDKIT_COLORS", "run=0,255,0:error=255,0,0")
    console = _console(color_system="truecolor")
    a_build(Progress(TtyRenderer(console)))
    out = _text(console)
    assert "\x1b[38;2;0;255;0m" in out and "\x1b[38;2;255;0;0m" in out
    for env in ({"NO_COLOR": "1"}, {"TERM": "dumb"}):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            console = _console(color_system="truecolor")
            a_build(Progress(TtyRenderer(console)))
            assert "\x1b[38" not in _text(console), env


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
