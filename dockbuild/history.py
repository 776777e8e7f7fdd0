"""Build records: every build's request, steps, outputs and whole logs, in the cache root.

A record is a directory ``<cache root>/history/<ID>/``: ``record.json`` (small, written
last) and ``logs/<N>`` (each step's output as it printed it, streamed to the file line by
line, never held in memory, never clipped). A build writes its record in
``history/.tmp-<ID>`` while holding a lock on it, and renames it into place when it ends:
concurrent builds share no file, and a build that was killed leaves a temp directory that
the next one removes once its lock is free. Records are kept as ``[history]`` in
config.toml says (``keep`` records, none older than ``keepDuration``).

A record never holds a secret: a secret's id is kept, never its source or value, and
nothing from the environment is recorded.

This module is loaded by ``dockbuild history`` alone: it imports nothing of the engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

from dockbuild.errors import DockbuildError
from dockbuild.progress import Sink, Vertex, plain_line

TYPE_CHECKING = False  # typing loads only for the type checker: `dockbuild history` starts lean
if TYPE_CHECKING:
    from typing import IO, Any

HISTORY = "history"
RECORD = "record.json"
DEFAULT_KEEP = 50
DEFAULT_KEEP_DURATION = 7 * 24 * 3600.0
_TMP = ".tmp-"
_GONE = ".rm-"
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def new_id() -> str:
    """25 lowercase letters and digits, as buildx's build IDs."""
    return "".join(_ALPHABET[b % 36] for b in os.urandom(25))


def history_dir(root: Path) -> Path:
    return root / HISTORY


class Record(Sink):
    """The record of a build being made; a progress sink (progress.Progress.record)."""

    def __init__(self, root: Path, info: dict[str, Any]) -> None:
        import fcntl

        self.id = new_id()
        self._dir = history_dir(root)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._tmp = self._dir / f"{_TMP}{self.id}"
        (self._tmp / "logs").mkdir(parents=True)
        # Held until the record is in place: a free lock marks the leftover of a dead build.
        self._lock_fd = os.open(self._tmp / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._info = {**info, "id": self.id, "started": time.time()}
        self._steps: dict[int, dict[str, Any]] = {}
        self._logs: dict[int, IO[bytes]] = {}
        self._warnings: list[str] = []
        self._outputs: list[dict[str, Any]] = []
        # Steps' threads report while the main thread may finish the record (an interrupt):
        # one lock for both, and nothing is written once the record is finished.
        self._guard = threading.Lock()
        self._finished = False

    def event(self, event: str, vertex: Vertex, extra: dict[str, str]) -> None:
        with self._guard:
            if not self._finished:
                self._event(event, vertex, extra)

    def _event(self, event: str, vertex: Vertex, extra: dict[str, str]) -> None:
        n = vertex.number
        if event == "start":
            self._steps[n] = {"number": n, "name": vertex.name, "started": vertex.started_at, "status": "running"}
            return
        if event == "log":
            log = self._logs.get(n)
            if log is None:
                log = self._logs[n] = open(self._tmp / "logs" / str(n), "ab")  # noqa: SIM115 (closed when the step ends)
            stream = "2" if extra["stream"] == "stderr" else "1"
            line = f"{vertex.elapsed:.3f} {stream} {extra['text']}\n".encode(errors="replace")
            log.write(line)
            return
        step = self._steps.setdefault(n, {"number": n, "name": vertex.name, "started": vertex.started_at})
        step.update(status=event, duration=round(vertex.elapsed, 6))
        if event == "error":
            step["error"] = extra.get("message", "")
        log = self._logs.pop(n, None)
        if log is not None:
            log.close()

    def message(self, text: str) -> None:
        with self._guard:
            self._warnings.append(text)

    def output(self, kind: str, dest: str | None, digest: str | None) -> None:
        """An output written, for ``inspect``."""
        with self._guard:
            self._outputs.append({"type": kind, "dest": dest, "digest": digest})

    def finish(self, status: str, error: str | None = None, image_id: str | None = None) -> None:
        """Write record.json and move the record into place (then keep the history in
        bounds). Never a reason for the build to fail: a record that cannot be written is
        dropped."""
        with self._guard:
            if self._finished:
                return
            self._finished = True
            self._write(status, error, image_id)
        with contextlib.suppress(OSError, DockbuildError):  # the next build tries again
            collect(self._dir.parent)

    def _write(self, status: str, error: str | None, image_id: str | None) -> None:
        for log in self._logs.values():
            log.close()
        self._logs.clear()
        steps = [self._steps[n] for n in sorted(self._steps)]
        ended = time.time()
        record = {
            **self._info,
            "status": status,
            "ended": ended,
            "duration": round(ended - self._info["started"], 6),
            "steps": steps,
            "cached": sum(s.get("status") == "cached" for s in steps),
            "warnings": self._warnings,
            "outputs": self._outputs,
            "image_id": image_id,
            "error": error,
        }
        try:
            (self._tmp / RECORD).write_text(json.dumps(record, indent=1))
            os.unlink(self._tmp / ".lock")  # still held: the directory is renamed next
            os.replace(self._tmp, self._dir / self.id)
        except OSError:
            import shutil  # loaded only to clean up: a build that writes its record never needs it

            shutil.rmtree(self._tmp, ignore_errors=True)
        finally:
            os.close(self._lock_fd)

    def exit(self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: object) -> bool:
        """An ExitStack callback: a build that raised is recorded as failed (or canceled),
        and a failed RUN's error points to its whole log."""
        if exc is None:
            return False
        from dockbuild.errors import ExecError

        if isinstance(exc, ExecError) and not exc.hint:
            with self._guard:
                failed = [n for n, s in self._steps.items() if s.get("status") == "error"]
            step = f" --step {failed[-1]}" if failed else ""
            exc.hint = f"the whole log: dockbuild history logs {self.id}{step}"
        if isinstance(exc, KeyboardInterrupt):
            self.finish("canceled", "interrupted")
        else:
            self.finish("error", getattr(exc, "message", None) or str(exc) or type(exc).__name__)
        return False


def request_info(request: Any, dockerfile_name: str, dockerfile_text: bytes) -> dict[str, Any]:
    """What a record keeps of a build request: never a secret's source or value."""
    context = request.context
    name = os.path.basename(os.path.abspath(context)) if "://" not in context and context != "-" else context
    return {
        "name": name + (f" ({request.target})" if request.target else ""),
        "context": context,
        "dockerfile": dockerfile_name,
        "dockerfile_text": dockerfile_text.decode(errors="replace"),
        "target": request.target,
        "platform": request.platform or "linux/amd64",
        "build_args": {k: v for k, v in request.build_args.items()},
        "build_contexts": dict(request.build_contexts),
        "secrets": [_secret_id(spec) for spec in request.secrets],
        "ssh": [spec.partition("=")[0] for spec in request.ssh],
        "tags": list(request.tags),
        "output_specs": list(request.outputs),
        "no_cache": request.no_cache,
    }


def _secret_id(spec: str) -> str:
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key == "id":
            return value
    return "?"


# Reading the history: dockbuild history ls / inspect / logs / rm / export.


def records(root: Path) -> list[dict[str, Any]]:
    """Every finished record, the newest first (a record being written is not listed)."""
    found = []
    directory = history_dir(root)
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            with open(os.path.join(entry.path, RECORD), "rb") as f:
                found.append(json.load(f))
        except (OSError, ValueError):
            continue  # removed meanwhile, or not a record
    found.sort(key=lambda r: r.get("started", 0), reverse=True)
    return found


def find(root: Path, ref: str | None) -> dict[str, Any]:
    """A record by ID (or a unique prefix), ``^N`` (the Nth before the newest), or the
    newest when ``ref`` is None, as buildx's REF."""
    found = records(root)
    if not found:
        raise DockbuildError("no build records", hint="every build leaves one; run a build first")
    if ref is None or ref.startswith("^"):
        offset = 0
        if ref is not None:
            try:
                offset = int(ref[1:])
            except ValueError:
                raise DockbuildError(f"invalid build reference {ref!r}", hint="an ID or ^N") from None
        if offset >= len(found):
            raise DockbuildError(f"no build record {ref}: there are {len(found)}")
        return found[offset]
    matches = [r for r in found if r["id"].startswith(ref)]
    if len(matches) != 1:
        what = "no build record" if not matches else "more than one build record matches"
        raise DockbuildError(f"{what} {ref!r}", hint="`dockbuild history ls` lists them")
    return matches[0]


def record_dir(root: Path, record: dict[str, Any]) -> Path:
    return history_dir(root) / str(record["id"])


def plain_log(root: Path, record: dict[str, Any], step: int | None, out: IO[str]) -> None:
    """The record's whole log in BuildKit's plain format, streamed (``history logs``)."""
    steps = record.get("steps", [])
    if step is not None:
        steps = [s for s in steps if s["number"] == step]
        if not steps:
            raise DockbuildError(f"build {record['id']} has no step {step}", hint=f"steps 1 to {len(record.get('steps', []))}")
    logs = record_dir(root, record) / "logs"
    for s in steps:
        n = s["number"]
        out.write(plain_line("start", n, s["name"], 0, {}) + "\n")
        try:
            f = open(logs / str(n), "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            f = None
        if f is not None:
            with f:
                for raw in f:
                    elapsed, _, rest = raw.decode(errors="replace").rstrip("\n").partition(" ")
                    _stream, _, text = rest.partition(" ")
                    out.write(f"#{n} {elapsed} {text}\n")
        status = s.get("status", "running")
        extra = {"message": s.get("error", "")}
        if status in ("cached", "done", "error"):
            out.write(plain_line(status, n, s["name"], s.get("duration", 0.0), extra) + "\n")


def remove(root: Path, record_id: str) -> None:
    """Remove a record; another process removing it too is no error."""
    import shutil

    directory = history_dir(root)
    gone = directory / f"{_GONE}{record_id}-{new_id()[:8]}"
    try:
        os.rename(directory / record_id, gone)  # atomic: the record is gone or whole
    except FileNotFoundError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def export(root: Path, record: dict[str, Any], dest: IO[bytes]) -> None:
    """A tarball (gzip) of the record: record.json and the logs."""
    import tarfile

    with tarfile.open(fileobj=dest, mode="w|gz") as tar:
        tar.add(record_dir(root, record), arcname=record["id"], recursive=True)


def policy() -> tuple[int, float]:
    """``[history] keep`` and ``keepDuration`` of config.toml."""
    from dockbuild import config

    table = config.load().get("history", {})
    if not isinstance(table, dict):
        raise DockbuildError("invalid config: [history] must be a table")
    keep = table.get("keep", DEFAULT_KEEP)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise DockbuildError(f"invalid config: [history] keep = {keep!r}: expected a count (0 or more)")
    age = table.get("keepDuration")
    duration = config.parse_duration(age, "[history] keepDuration") if age is not None else DEFAULT_KEEP_DURATION
    return keep, duration


def collect(root: Path, keep: int | None = None, max_age: float | None = None) -> list[str]:
    """Keep the newest ``keep`` records, none older than ``max_age`` seconds; remove the
    leftovers of killed builds. Returns the IDs removed."""
    if keep is None or max_age is None:
        keep_default, age_default = policy()
        keep = keep_default if keep is None else keep
        max_age = age_default if max_age is None else max_age
    removed = []
    now = time.time()
    try:
        entries = [e for e in os.scandir(history_dir(root)) if not e.name.startswith(".")]
    except FileNotFoundError:
        return []
    # A record's directory is renamed into place when its build ends: its mtime is then.
    entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    for i, entry in enumerate(entries):
        if i >= keep or now - entry.stat().st_mtime > max_age:
            remove(root, entry.name)
            removed.append(entry.name)
    for leftover in leftovers(root):
        import shutil

        shutil.rmtree(leftover, ignore_errors=True)
    return removed


def leftovers(root: Path) -> list[Path]:
    """Temp directories of builds that were killed (their lock is free), and records that
    a killed ``rm`` left half removed."""
    import fcntl

    found = []
    try:
        entries = list(os.scandir(history_dir(root)))
    except FileNotFoundError:
        return []
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith(_GONE):
            found.append(path)
        elif entry.name.startswith(_TMP):
            try:
                fd = os.open(path / ".lock", os.O_RDWR)
            except FileNotFoundError:
                # Made but not locked yet, or half removed: a build locks it at once.
                if time.time() - entry.stat().st_mtime > 60:
                    found.append(path)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running build
            finally:
                os.close(fd)
            found.append(path)
        elif not (path / RECORD).is_file():
            found.append(path)
    return found


def check(root: Path, repair: bool) -> list[str]:
    """``debug check-cache``: the records' leftovers (removed with ``repair``)."""
    import shutil

    problems = []
    for path in leftovers(root):
        problems.append(f"build record leftover {path}")
        if repair:
            shutil.rmtree(path, ignore_errors=True)
    return problems
