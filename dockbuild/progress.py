"""Progress: the events every part of a build emits, and the renderers that show them.

Nothing else in dockbuild prints. A step is a :class:`Vertex`; it starts, writes log
lines, and ends CACHED, DONE or ERROR. Renderers: ``plain`` (BuildKit's ``#N`` lines, for
CI and pipes), ``tty`` (a live rich view), ``rawjson`` (one JSON event a line) and
``quiet`` (nothing but what the CLI prints on failure). All write to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from typing import TextIO

TYPE_CHECKING = False
if TYPE_CHECKING:
    from rich.table import Table


class Vertex:
    """One step of the build as the user sees it."""

    def __init__(self, progress: Progress, number: int, name: str) -> None:
        self._progress = progress
        self.number = number
        self.name = name
        self.started = time.monotonic()
        self.ended: float | None = None
        self.status = "running"  # running | cached | done | error
        self._partial = {"stdout": b"", "stderr": b""}
        self.tail: list[str] = []  # the last log lines, for error reports

    def log(self, stream: str, data: bytes) -> None:
        """Feed raw output; complete lines are rendered, partial ones wait for their end."""
        buf = self._partial.get(stream, b"") + data
        *lines, rest = buf.split(b"\n")
        self._partial[stream] = rest
        for line in lines:
            self._line(stream, line.decode(errors="replace"))

    def _line(self, stream: str, text: str) -> None:
        self.tail.append(text)
        del self.tail[:-20]
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


class Progress:
    """The sink for events; a renderer decides how they look."""

    def __init__(self, renderer: Renderer) -> None:
        self._renderer = renderer
        self._lock = threading.Lock()
        self._count = 0
        self.vertices: list[Vertex] = []

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

    def _emit(self, event: str, vertex: Vertex, **extra: str) -> None:
        with self._lock:
            self._renderer.event(event, vertex, extra)

    def close(self) -> None:
        with self._lock:
            self._renderer.close()


class Renderer:
    def event(self, event: str, vertex: Vertex, extra: dict[str, str]) -> None:
        raise NotImplementedError

    def message(self, text: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class PlainRenderer(Renderer):
    """BuildKit's plain progress format."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr

    def event(self, event: str, vertex: Vertex, extra: dict[str, str]) -> None:
        n = vertex.number
        if event == "start":
            text = f"\n#{n} {vertex.name}"
        elif event == "log":
            text = f"#{n} {vertex.elapsed:.3f} {extra['text']}"
        elif event == "cached":
            text = f"#{n} CACHED"
        elif event == "done":
            text = f"#{n} DONE {vertex.elapsed:.1f}s"
        else:
            text = f"#{n} ERROR: {extra.get('message', '')}"
        self._write(text)

    def message(self, text: str) -> None:
        self._write(text)

    def _write(self, text: str) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError):
            print(text, file=self.out, flush=True)


class QuietRenderer(Renderer):
    def event(self, event: str, vertex: Vertex, extra: dict[str, str]) -> None:
        pass

    def message(self, text: str) -> None:
        if text.startswith("WARNING"):
            print(text, file=sys.stderr, flush=True)


class RawJSONRenderer(Renderer):
    """One JSON object a line: {"event", "vertex", "name", "time", ...}."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr

    def event(self, event: str, vertex: Vertex, extra: dict[str, str]) -> None:
        record = {"event": event, "vertex": vertex.number, "name": vertex.name, "time": time.time()}
        record.update(extra)
        if event in ("cached", "done", "error"):
            record["duration"] = round(vertex.elapsed, 6)
        print(json.dumps(record), file=self.out, flush=True)

    def message(self, text: str) -> None:
        print(json.dumps({"event": "message", "text": text}), file=self.out, flush=True)


class TtyRenderer(Renderer):
    """A live view on a terminal: one line a step, the running steps' last log lines."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self._console = Console(stderr=True)
        self._live = Live(console=self._console, refresh_per_second=8, transient=False)
        self._vertices: list[Vertex] = []
        self._started = time.monotonic()
        self._live.start()

    def _render(self) -> Table:
        from rich.table import Table
        from rich.text import Text

        table = Table.grid(padding=(0, 1))
        table.add_column(justify="left")
        table.add_column(justify="right")
        title = Text(f"[+] Building {time.monotonic() - self._started:.1f}s", style="bold")
        table.add_row(title, "")
        for v in self._vertices:
            style = {"cached": "blue", "done": "green", "error": "red"}.get(v.status, "yellow")
            state = {"cached": "CACHED", "done": f"{v.elapsed:.1f}s", "error": "ERROR"}.get(
                v.status, f"{v.elapsed:.1f}s"
            )
            table.add_row(Text(f" => {v.name}", style=style), Text(state, style=style))
            if v.status == "running":
                for line in v.tail[-6:]:
                    table.add_row(Text(f"    {line}", style="dim"), "")
        return table

    def event(self, event: str, vertex: Vertex, extra: dict[str, str]) -> None:
        if event == "start":
            self._vertices.append(vertex)
        self._live.update(self._render())

    def message(self, text: str) -> None:
        self._live.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self._live.update(self._render())
        self._live.stop()


def make_progress(mode: str) -> Progress:
    """``auto`` picks ``tty`` on a terminal and ``plain`` elsewhere."""
    if mode == "auto":
        mode = "tty" if sys.stderr.isatty() else "plain"
    renderers = {
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
