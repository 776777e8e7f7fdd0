"""Progress: the events every part of a build emits, and the renderers that show them.

Nothing else in dockbuild prints. A step is a :class:`Vertex`; it starts, writes log
lines, and ends CACHED, DONE or ERROR. Renderers: ``plain`` (BuildKit's ``#N`` lines, for
CI and pipes), ``tty`` (a live rich view, as BuildKit draws it), ``rawjson`` (BuildKit's
SolveStatus JSON, one object a line, as buildx prints it) and ``quiet`` (nothing but what
the CLI prints on failure). All write to stderr. Besides the renderer, a *record* (the
build's history record, dockbuild/history.py) sees every event: logs are never clipped,
they stream to the record's files and are never held in memory.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import sys
import threading
import time
from typing import TextIO

TYPE_CHECKING = False
if TYPE_CHECKING:
    from rich.console import Console, RenderableType

# A line longer than this is passed on in pieces: a step that prints 50 MB without a
# newline must not grow a buffer of 50 MB.
MAX_LINE = 64 * 1024
STREAMS = {"stdout": 1, "stderr": 2}


class Vertex:
    """One step of the build as the user sees it."""

    def __init__(self, progress: Progress, number: int, name: str) -> None:
        self._progress = progress
        self.number = number
        self.name = name
        self.started = time.monotonic()
        self.started_at = time.time()
        self.ended: float | None = None
        self.status = "running"  # running | cached | done | error
        self.error_message = ""
        self._partial = {"stdout": b"", "stderr": b""}
        self.tail: collections.deque[str] = collections.deque(maxlen=20)  # for error reports

    @functools.cached_property
    def digest(self) -> str:
        """An identifier in BuildKit's form (rawjson's ``vertex``), unique in the build."""
        import hashlib

        return "sha256:" + hashlib.sha256(f"{self.number} {self.name}".encode()).hexdigest()

    def log(self, stream: str, data: bytes) -> None:
        """Feed raw output; complete lines are rendered, partial ones wait for their end."""
        buf = self._partial.get(stream, b"") + data
        *lines, rest = buf.split(b"\n")
        while len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self._partial[stream] = rest
        for line in lines:
            self._line(stream, line.decode(errors="replace"))

    def _line(self, stream: str, text: str) -> None:
        for secret in self._progress.secrets:
            if secret in text:
                text = text.replace(secret, "****")
        self.tail.append(text)
        self._progress._emit("log", self, stream=stream, text=text)

    def _flush(self) -> None:
        for stream, rest in self._partial.items():
            if rest:
                self._partial[stream] = b""
                self._line(stream, rest.decode(errors="replace"))

    def cached(self) -> None:
        self._end("cached")

    def done(self) -> None:
        self._end("done")

    def error(self, message: str) -> None:
        self.error_message = message
        self._end("error", message=message)

    def _end(self, status: str, **extra: str) -> None:
        if self.ended is not None:
            return
        self._flush()
        self.ended = time.monotonic()
        self.status = status
        self._progress._emit(status, self, **extra)

    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started


class Sink:
    """What sees the events: a renderer, a build record."""

    def event(self, event: str, vertex: Vertex, extra: dict[str, str]) -> None:
        raise NotImplementedError

    def message(self, text: str) -> None:
        raise NotImplementedError

    def close(self, summary: str) -> None:
        pass


Renderer = Sink


class Progress:
    """The sink for events; a renderer decides how they look, a record keeps them."""

    def __init__(self, renderer: Sink, record: Sink | None = None) -> None:
        self._renderer = renderer
        self.record = record
        self._lock = threading.Lock()
        self._count = 0
        self._started = time.monotonic()
        self.vertices: list[Vertex] = []
        self.written: list[str] = []  # what the outputs wrote, for the summary line
        self.secrets: tuple[str, ...] = ()  # masked in every log line (see redact)

    def redact(self, values: list[bytes]) -> None:
        """Mask these secret values (each of their lines of 4 characters or more) in every
        log line a step prints: no renderer shows them, no record keeps them."""
        lines = {line.strip() for value in values for line in value.decode(errors="replace").splitlines()}
        self.secrets = tuple(sorted((line for line in lines if len(line) >= 4), key=len, reverse=True))

    def vertex(self, name: str) -> Vertex:
        with self._lock:
            self._count += 1
            v = Vertex(self, self._count, name)
            self.vertices.append(v)
        self._emit("start", v)
        return v

    def message(self, text: str) -> None:
        """A line for the user that belongs to no step (warnings, hints)."""
        with self._lock:
            self._renderer.message(text)
            if self.record is not None:
                self.record.message(text)

    def wrote(self, what: str) -> None:
        """An output was written (``what``: its type and destination), for the summary."""
        self.written.append(what)

    def summary(self) -> str:
        """One line: the steps, how many were cached, the time, the outputs written."""
        steps = len(self.vertices)
        cached = sum(v.status == "cached" for v in self.vertices)
        line = f"{steps} step{'s' if steps != 1 else ''}, {cached} cached, {time.monotonic() - self._started:.1f}s"
        if self.written:
            line += ", wrote " + ", ".join(self.written)
        return line

    def _emit(self, event: str, vertex: Vertex, **extra: str) -> None:
        with self._lock:
            self._renderer.event(event, vertex, extra)
            if self.record is not None:
                self.record.event(event, vertex, extra)

    def close(self) -> None:
        with self._lock:
            self._renderer.close(self.summary())


class PlainRenderer(Sink):
    """BuildKit's plain progress format."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr

    def event(self, event: str, vertex: Vertex, extra: dict[str, str]) -> None:
        self._write(plain_line(event, vertex.number, vertex.name, vertex.elapsed, extra))

    def message(self, text: str) -> None:
        self._write(text)

    def _write(self, text: str) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError):
            print(text, file=self.out, flush=True)


def plain_line(event: str, number: int, name: str, elapsed: float, extra: dict[str, str]) -> str:
    """One event in BuildKit's plain format (the renderer's and ``history logs``'s)."""
    if event == "start":
        return f"\n#{number} {name}"
    if event == "log":
        return f"#{number} {elapsed:.3f} {extra['text']}"
    if event == "cached":
        return f"#{number} CACHED"
    if event == "done":
        return f"#{number} DONE {elapsed:.1f}s"
    return f"#{number} ERROR: {extra.get('message', '')}"


class QuietRenderer(Sink):
    def event(self, event: str, vertex: Vertex, extra: dict[str, str]) -> None:
        pass

    def message(self, text: str) -> None:
        if text.startswith("WARNING"):
            print(text, file=sys.stderr, flush=True)


def _timestamp(seconds: float) -> str:
    """RFC 3339 with nanoseconds, UTC, as Go's time.Time marshals."""
    whole = int(seconds)
    nanos = int(round((seconds - whole) * 1e9))
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{stamp}.{nanos:09d}Z"


class RawJSONRenderer(Sink):
    """BuildKit's SolveStatus, one JSON object a line: ``vertexes``, ``statuses``, ``logs``
    and ``warnings`` with BuildKit's field names, log ``data`` in base64 (Go's encoding of
    a byte slice), empty fields left out as Go's ``omitempty`` does."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr

    def event(self, event: str, vertex: Vertex, extra: dict[str, str]) -> None:
        import base64

        now = time.time()
        if event == "log":
            data = base64.b64encode((extra["text"] + "\n").encode()).decode()
            log = {"vertex": vertex.digest, "stream": STREAMS.get(extra["stream"], 1), "data": data}
            self._write({"logs": [{**log, "timestamp": _timestamp(now)}]})
            return
        v: dict[str, object] = {"digest": vertex.digest, "name": vertex.name}
        v["started"] = _timestamp(vertex.started_at)
        if event != "start":
            v["completed"] = _timestamp(vertex.started_at + vertex.elapsed)
        if event == "cached":
            v["cached"] = True
        if event == "error":
            v["error"] = extra.get("message", "")
        self._write({"vertexes": [v]})

    def message(self, text: str) -> None:
        """A warning is a ``warnings`` entry; another message (``--explain-cache``) a log
        line of no step (no ``vertex``), which buildx's readers skip."""
        import base64

        data = base64.b64encode(text.encode()).decode()
        if text.startswith("WARNING"):
            self._write({"warnings": [{"level": 1, "short": data}]})
        else:
            log = {"stream": 2, "data": base64.b64encode((text + "\n").encode()).decode()}
            self._write({"logs": [{**log, "timestamp": _timestamp(time.time())}]})

    def _write(self, status: dict[str, object]) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError):
            print(json.dumps(status, separators=(",", ":")), file=self.out, flush=True)


# BuildKit's colours (progressui): finished steps, errors, cancelled steps, warnings.
_DEFAULT_COLORS = {"run": "blue", "error": "red", "cancel": "yellow", "warning": "yellow"}


def parse_colors(spec: str) -> dict[str, str]:
    """``BUILDKIT_COLORS`` (``run=123,20,245:error=yellow:cancel=blue:warning=white``):
    names and R,G,B triples, as rich styles; what cannot be read keeps its default."""
    colors = dict(_DEFAULT_COLORS)
    for item in spec.split(":"):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key not in colors or not value:
            continue
        parts = value.split(",")
        if len(parts) == 3 and all(p.strip().isdigit() and int(p) < 256 for p in parts):
            colors[key] = "rgb({},{},{})".format(*(int(p) for p in parts))
        elif value.isalpha():
            colors[key] = value.lower()
    return colors


def tty_log_lines() -> int:
    """``BUILDKIT_TTY_LOG_LINES``: how many log lines a running step shows (default 6)."""
    try:
        return max(0, int(os.environ.get("BUILDKIT_TTY_LOG_LINES", "6")))
    except ValueError:
        return 6


class TtyRenderer(Sink):
    """A live view on a terminal, as BuildKit draws it: ``[+] Building 3.2s (4/6)``, one
    line a step with its timer (``CACHED``/``ERROR`` before the name), the last log lines
    of every running step (parallel steps together), the warnings and a summary at the end.
    """

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console
        from rich.live import Live

        no_color = "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb"
        self._console = console or Console(stderr=True, no_color=no_color)
        if no_color:
            self._console.no_color = True
        self._colors = parse_colors(os.environ.get("BUILDKIT_COLORS", ""))
        self._log_lines = tty_log_lines()
        self._vertices: list[Vertex] = []
        self._warnings: list[str] = []
        self._started = time.monotonic()
        self._ended: float | None = None
        self._live = Live(console=self._console, refresh_per_second=8, transient=False, get_renderable=self.view)
        self._live.start()

    def view(self) -> RenderableType:
        """The current screen."""
        from rich.table import Table
        from rich.text import Text

        table = Table.grid(padding=(0, 1), expand=True)
        table.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        table.add_column(justify="right", no_wrap=True)
        finished = sum(v.status != "running" for v in self._vertices)
        elapsed = (self._ended or time.monotonic()) - self._started
        table.add_row(Text(f"[+] Building {elapsed:.1f}s ({finished}/{len(self._vertices)})"), "")
        for v in list(self._vertices):
            prefix = {"cached": "CACHED ", "error": "ERROR "}.get(v.status, "")
            color = {"running": "", "error": self._colors["error"]}.get(v.status, self._colors["run"])
            table.add_row(Text(f" => {prefix}{v.name}", style=color), Text(f"{v.elapsed:.1f}s", style=color))
            if v.status == "running" and self._log_lines:
                for line in list(v.tail)[-self._log_lines :]:
                    table.add_row(Text(f" => => # {line}", style="dim"), "")
        return table

    def event(self, event: str, vertex: Vertex, extra: dict[str, str]) -> None:
        if event == "start":
            self._vertices.append(vertex)
        if event != "log":  # log lines show at the next refresh
            self._live.refresh()

    def message(self, text: str) -> None:
        if text.startswith("WARNING"):
            self._warnings.append(text)  # listed at the end, as BuildKit does
            return
        self._live.console.print(text, markup=False, highlight=False)

    def close(self, summary: str) -> None:
        from rich.text import Text

        self._ended = time.monotonic()
        self._live.refresh()
        self._live.stop()
        if self._warnings:
            n = len(self._warnings)
            header = Text(f" {n} warning{'s' if n != 1 else ''} found:", style=self._colors["warning"])
            self._console.print(header)
            for text in self._warnings:
                self._console.print(Text(f" - {text.removeprefix('WARNING: ')}", style=self._colors["warning"]))
        self._console.print(Text(summary), markup=False, highlight=False)


def make_progress(mode: str) -> Progress:
    """``auto`` picks ``tty`` on a terminal and ``plain`` elsewhere."""
    if mode == "auto":
        mode = "tty" if sys.stderr.isatty() and os.environ.get("TERM") != "dumb" else "plain"
    renderers: dict[str, type[Sink]] = {
        "plain": PlainRenderer,
        "quiet": QuietRenderer,
        "rawjson": RawJSONRenderer,
        "tty": TtyRenderer,
    }
    if mode not in renderers:
        from dockbuild.errors import DockbuildError

        raise DockbuildError(
            f"unknown progress mode {mode!r}", hint="use auto, plain, tty, rawjson or quiet"
        )
    return Progress(renderers[mode]())
