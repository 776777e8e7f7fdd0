"""Platform names (``linux/arm64``, ``linux/arm/v7``): parsed and normalised as containerd's
platforms package does (``aarch64`` -> ``arm64``, ``armhf`` -> ``arm/v7``, ``x86_64/v1`` ->
``amd64``), for ``--platform``, ``FROM --platform`` and the automatic platform ARGs.

Stdlib only: the frontend, the engine and the CLI read it alike.
"""

from __future__ import annotations

import platform as _host

from dockbuild.errors import DockbuildError

# containerd's known OS names (a single word that is one of them means that OS).
_KNOWN_OS = frozenset(
    ("aix", "android", "darwin", "dragonfly", "freebsd", "illumos", "ios", "js", "linux",
     "netbsd", "openbsd", "plan9", "solaris", "wasip1", "windows")
)


def _normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    """containerd's normalizeArch: Go's architecture name and its canonical variant."""
    arch, variant = arch.lower(), variant.lower()
    if arch in ("i386", "i486", "i586", "i686"):
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        if variant in ("8", "v8", "v8.0"):
            return "arm64", ""
        if variant in ("9", "9.0", "v9.0"):
            return "arm64", "v9"
        if variant.startswith("8.") or variant.startswith("9."):
            return "arm64", "v" + variant
        return "arm64", variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            return "arm", "v7"
        if variant in ("5", "6", "8"):
            return "arm", "v" + variant
        return "arm", variant
    return arch, variant


def host() -> str:
    """The platform of this machine (dockbuild runs on Linux only)."""
    arch, variant = _normalize_arch(_host.machine() or "amd64", "")
    return format_platform("linux", arch, variant)


def format_platform(os_name: str, arch: str, variant: str = "") -> str:
    return "/".join(p for p in (os_name, arch, variant) if p)


def normalize(text: str) -> str:
    """``OS[/ARCH[/VARIANT]]`` or ``ARCH`` -> the canonical ``os/arch[/variant]``.

    As containerd's platforms.Parse + Normalize: a single word is an OS (with this
    machine's architecture) when it names one, else an architecture of Linux; ``local``
    is this machine's platform.
    """
    raw = text.strip()
    if raw == "local":
        return host()
    parts = raw.split("/")
    if not all(parts) or len(parts) > 3 or any(" " in p for p in parts):
        raise DockbuildError(
            f"invalid platform {text!r}",
            hint="expected OS/ARCH[/VARIANT], e.g. linux/amd64, linux/arm64, linux/arm/v7",
        )
    if len(parts) == 1:
        word = parts[0].lower()
        if word in _KNOWN_OS or word == "macos":
            host_os, host_arch, *host_variant = host().split("/")
            parts = [word, host_arch, *host_variant]
        else:
            parts = ["linux", word]
    os_name = parts[0].lower()
    if os_name == "macos":
        os_name = "darwin"
    arch, variant = _normalize_arch(parts[1], parts[2] if len(parts) == 3 else "")
    return format_platform(os_name, arch, variant)


def parse_list(text: str) -> list[str]:
    """A comma-separated ``--platform`` value, each normalised, duplicates dropped."""
    out: list[str] = []
    for item in text.split(","):
        if not item.strip():
            raise DockbuildError(f"invalid platform list {text!r}: an empty entry")
        value = normalize(item)
        if value not in out:
            out.append(value)
    return out


def split(platform: str) -> tuple[str, str, str]:
    """``linux/arm/v7`` -> (os, architecture, variant)."""
    os_name, _, rest = platform.partition("/")
    arch, _, variant = rest.partition("/")
    return os_name, arch, variant


def path_name(platform: str) -> str:
    """The directory (or tar prefix) BuildKit names a platform's result: ``linux_arm64``."""
    return platform.replace("/", "_")
