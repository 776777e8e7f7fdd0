"""The .dockerignore file format: patterns, comments, ``!`` exceptions (moby's ignorefile)."""

from __future__ import annotations

import posixpath

from dockbuild.errors import DockbuildError


def parse_dockerignore(data: bytes) -> list[str]:
    """The patterns of a .dockerignore file, cleaned as moby does; ``!`` kept as a prefix."""
    text = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
    patterns = []
    for raw in text.splitlines():
        if raw.startswith("#"):  # comments only at column 0, before trimming
            continue
        line = raw.strip()
        if not line:
            continue
        invert = line.startswith("!")
        if invert:
            line = line[1:].strip()
        if line:
            line = posixpath.normpath(line).lstrip("/") or "/"
        elif invert:
            # moby/patternmatcher New: an exception that excludes nothing is an error.
            raise DockbuildError('failed to parse .dockerignore: illegal exclusion pattern: "!"')
        patterns.append(("!" if invert else "") + line)
    return patterns
