"""Where the cache lives: ``DOCKBUILD_ROOT``, else ``$XDG_CACHE_HOME/dockbuild``, else
``~/.cache/dockbuild``.

A module of its own, without the store's imports: a build looks for the cache database
first thing, to start hashing the context in a child process while the rest of
dockbuild loads (build.py).
"""

from __future__ import annotations

import os
from pathlib import Path


def default_root() -> Path:
    env = os.environ.get("DOCKBUILD_ROOT")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "dockbuild"
