"""User configuration: ``~/.config/dockbuild/config.toml`` (stdlib tomllib).

Where: ``$DOCKBUILD_CONFIG`` if set, else ``$XDG_CONFIG_HOME/dockbuild/config.toml``,
else ``~/.config/dockbuild/config.toml``. A missing file means the defaults.

The cache's garbage collection uses buildkitd.toml's key names, so a ``[worker.oci]``
section copied from a buildkitd.toml works unchanged; ``[cache]`` is our own name for the
same keys::

    [cache]
    gc = true
    reservedSpace = "2GB"     # bytes, a size with a unit, or a percentage of the disk
    maxUsedSpace = "20GB"
    minFreeSpace = "10%"

    [[cache.gcpolicy]]
    filters = ["type==exec.cachemount"]
    keepDuration = "48h"
    reservedSpace = "512MB"

Other engineers may add their own sections (registry mirrors, ...); each reads its own.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from dockbuild.errors import DockbuildError


def config_path() -> Path:
    env = os.environ.get("DOCKBUILD_CONFIG")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "dockbuild" / "config.toml"


def load() -> dict[str, Any]:
    """The whole config file as a dict ({} when there is none)."""
    path = config_path()
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise DockbuildError(f"cannot read config {path}: {e.strerror}") from e
    # A build asks several times; parse once per version of the file.
    import copy  # loaded only when there is a config file

    return copy.deepcopy(_parse(path, st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=4)
def _parse(path: Path, _mtime_ns: int, _size: int) -> dict[str, Any]:
    import tomllib

    try:
        data = path.read_bytes()
    except OSError as e:
        raise DockbuildError(f"cannot read config {path}: {e.strerror}") from e
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DockbuildError(f"invalid config {path}: {e}") from e


def max_parallelism() -> int | None:
    """How many steps may run at once: ``[worker.oci] max-parallelism`` (buildkitd.toml's
    name), or None when the file does not say."""
    worker = load().get("worker") or {}
    value = (worker.get("oci") or {}).get("max-parallelism") if isinstance(worker, dict) else None
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DockbuildError(f"config: [worker.oci] max-parallelism must be a positive integer, not {value!r}")
    return value


# -- sizes and durations, as buildkitd.toml spells them ----------------------------------

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}  # fmt: skip


class Size(NamedTuple):
    """A byte count, or a percentage of the disk the cache lives on."""

    bytes: int = 0
    percent: float | None = None

    def resolve(self, disk_total: int) -> int:
        if self.percent is not None:
            return int(disk_total * self.percent / 100)
        return self.bytes


def parse_size(value: Any, what: str = "size") -> Size:
    """``1073741824``, ``"512MB"``, ``"10GiB"``, ``"30%"`` (units are 1024-based, as
    BuildKit reads them)."""
    if isinstance(value, bool):
        raise DockbuildError(f"invalid {what} {value!r}")
    if isinstance(value, int | float):
        return Size(int(value))
    text = str(value).strip().lower().replace(" ", "")
    if text.endswith("%"):
        try:
            return Size(percent=float(text[:-1]))
        except ValueError:
            raise DockbuildError(f"invalid {what} {value!r}") from None
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-z]*)", text)
    if not m or m.group(2) not in _UNITS:
        raise DockbuildError(f"invalid {what} {value!r}", hint="e.g. 512MB, 10GB, 20%")
    return Size(int(float(m.group(1)) * _UNITS[m.group(2)]))


_DURATION = r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d|w)"  # compiled by re when first used
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any, what: str = "duration") -> float:
    """Seconds from ``172800``, ``"48h"``, ``"1h30m"``, ``"60d"`` (Go's units, plus d/w)."""
    if isinstance(value, bool):
        raise DockbuildError(f"invalid {what} {value!r}")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip().lower()
    if text.isdigit():
        return float(text)
    pos, total = 0, 0.0
    for m in re.finditer(_DURATION, text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise DockbuildError(f"invalid {what} {value!r}", hint="e.g. 48h, 30m, 7d or seconds")
    return total


# -- garbage collection -----------------------------------------------------------------


class GCPolicy(NamedTuple):
    """One rule of an ordered GC policy (buildkitd.toml's ``[[worker.oci.gcpolicy]]``)."""

    all: bool = False
    filters: tuple[str, ...] = ()
    keep_duration: float = 0.0  # seconds; records used more recently are kept
    reserved_space: Size | None = None
    max_used_space: Size | None = None
    min_free_space: Size | None = None


class GCConfig(NamedTuple):
    enabled: bool = True
    reserved_space: Size = Size(percent=10)
    max_used_space: Size = Size(percent=60)
    min_free_space: Size = Size(percent=20)
    policies: tuple[GCPolicy, ...] = ()
    # BuildKit caps its percentage defaults: 10GB reserved, 100GB at most.
    caps: tuple[int, int] = (10 << 30, 100 << 30)


_NO_CAP = 1 << 62


def default_policies() -> tuple[GCPolicy, ...]:
    """BuildKit's default rules, in order."""
    return (
        GCPolicy(
            filters=("type==source.local", "type==exec.cachemount", "type==source.git.checkout"),
            keep_duration=48 * 3600,
            reserved_space=Size(512 << 20),
        ),
        GCPolicy(keep_duration=60 * 86400),
        GCPolicy(),
        GCPolicy(all=True),
    )


def gc_config(data: dict[str, Any] | None = None) -> GCConfig:
    """The GC settings from ``[cache]`` (or a buildkitd.toml ``[worker.oci]``)."""
    data = load() if data is None else data
    section = data.get("cache")
    if section is None:
        section = data.get("worker", {}).get("oci", {})
    if not isinstance(section, dict):
        raise DockbuildError("invalid config: [cache] must be a table")

    def size(table: dict[str, Any], key: str, old: str | None = None) -> Size | None:
        value = table.get(key, table.get(old) if old else None)
        return None if value is None else parse_size(value, key)

    defaults = GCConfig()
    policies = []
    for i, raw in enumerate(section.get("gcpolicy", [])):
        if not isinstance(raw, dict):
            raise DockbuildError(f"invalid config: gcpolicy #{i} must be a table")
        filters = raw.get("filters", [])
        if isinstance(filters, str):
            filters = [filters]
        policies.append(
            GCPolicy(
                all=bool(raw.get("all", False)),
                filters=tuple(str(f) for f in filters),
                keep_duration=parse_duration(raw.get("keepDuration", 0), "keepDuration"),
                reserved_space=size(raw, "reservedSpace", "keepBytes"),
                max_used_space=size(raw, "maxUsedSpace"),
                min_free_space=size(raw, "minFreeSpace"),
            )
        )
    return GCConfig(
        enabled=bool(section.get("gc", True)),
        reserved_space=size(section, "reservedSpace", "keepBytes") or defaults.reserved_space,
        max_used_space=size(section, "maxUsedSpace") or defaults.max_used_space,
        min_free_space=size(section, "minFreeSpace") or defaults.min_free_space,
        policies=tuple(policies) or default_policies(),
        caps=(
            defaults.caps[0] if size(section, "reservedSpace", "keepBytes") is None else _NO_CAP,
            defaults.caps[1] if size(section, "maxUsedSpace") is None else _NO_CAP,
        ),
    )
