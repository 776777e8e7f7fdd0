"""Platform names (``linux/arm64``, ``linux/arm/v7``): parsed, normalised and matched as
containerd's platforms package does (``aarch64`` -> ``arm64``, ``armhf`` -> ``arm/v7``,
``x86_64/v1`` -> ``amd64``), for ``--platform``, ``FROM --platform``, the automatic
platform ARGs and the choice of an image index's entry.

Stdlib only: the frontend, the engine and the CLI read it alike.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple
from urllib.parse import unquote

from dockbuild.errors import DockbuildError

# containerd's isKnownOS / isKnownArch (database.go).
_KNOWN_OS = frozenset(
    ("aix", "android", "darwin", "dragonfly", "freebsd", "hurd", "illumos", "ios", "js",
     "linux", "nacl", "netbsd", "openbsd", "plan9", "solaris", "windows", "zos")
)
_KNOWN_ARCH = frozenset(
    ("386", "amd64", "amd64p32", "arm", "armbe", "arm64", "arm64be", "ppc64", "ppc64le",
     "loong64", "mips", "mipsle", "mips64", "mips64le", "mips64p32", "mips64p32le", "ppc",
     "riscv", "riscv64", "s390", "s390x", "sparc", "sparc64", "wasm")
)
# containerd's specifierRe and osRe (platforms.go): an OS may carry (version+feature+...).
# Patterns, compiled by re when a platform is first parsed (a no-op rebuild parses none).
_PART_RE = r"[A-Za-z0-9_.-]+"
_OS_RE = r"([A-Za-z0-9_-]+)(?:\(([A-Za-z0-9_.%-]*)((?:\+[A-Za-z0-9_.%-]+)*)\))?"
_HINT = "expected OS/ARCH[/VARIANT], e.g. linux/amd64, linux/arm64, linux/arm/v7"
# What the kernel calls this machine's CPU -> Go's architecture and variant (Go knows its
# own GOARCH; Python reads uname, whose 32-bit ARM and x86 names containerd never sees).
_UNAME = {"armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"),
          "i686": ("386", ""), "i586": ("386", ""), "i486": ("386", "")}
# containerd's arm64variantToVersion (compare.go): the (major, newest minor) an arm64
# variant runs, newest first.
_ARM64_RUNS: dict[str, tuple[tuple[int, int], ...]] = {
    **{f"v8.{m}": ((8, m),) for m in range(10)},
    **{f"v9.{m}": ((9, m), (8, min(m + 5, 9))) for m in range(8)},
    "v8": ((8, 0),),
    "v9": ((9, 0), (8, 5)),
}


class Platform(NamedTuple):
    """One platform as OCI's platform object has it (a named tuple: a no-op rebuild
    loads this module, and the dataclasses module is a large part of its start-up)."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()

    def __str__(self) -> str:
        """containerd's FormatAll: ``os[(version+features)]/arch[/variant]``."""
        head = self.os
        if self.os_version or self.os_features:
            features = sorted({f for f in self.os_features if f})
            inner = _encode(self.os_version) + "".join("+" + _encode(f) for f in features)
            if inner:
                head += f"({inner})"
        return "/".join(p for p in (head, self.architecture, self.variant) if p)


def _encode(value: str) -> str:
    for char, code in (("%", "%25"), ("+", "%2B"), ("(", "%28"), (")", "%29"), ("/", "%2F")):
        value = value.replace(char, code)
    return value


def normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    """containerd's normalizeArch: Go's architecture name and its canonical variant."""
    arch, variant = arch.lower(), variant.lower()
    if arch == "i386":
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        if variant in ("8", "v8", "v8.0"):
            return "arm64", ""
        if variant in ("9", "9.0", "v9.0"):
            return "arm64", "v9"
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
    return arch, variant


def normalized(p: Platform) -> Platform:
    """containerd's Normalize: OS lower-cased (``macos`` is darwin), architecture and
    variant by normalize_arch, OS features sorted without duplicates."""
    os_name = p.os.lower() or "linux"
    arch, variant = normalize_arch(p.architecture, p.variant)
    features = tuple(sorted(set(p.os_features)))
    return Platform("darwin" if os_name == "macos" else os_name, arch, variant, p.os_version, features)


def _host_platform() -> Platform:
    machine = (os.uname().machine or "amd64").lower()  # platform.machine(), without loading platform
    arch, variant = _UNAME.get(machine, (machine, ""))
    return normalized(Platform("linux", arch, variant))


def host() -> str:
    """The platform of this machine (dockbuild runs on Linux only)."""
    return str(_host_platform())


def format_platform(os_name: str, arch: str, variant: str = "") -> str:
    return "/".join(p for p in (os_name, arch, variant) if p)


def parse(text: str) -> Platform:
    """containerd's Parse: ``OS[(version+features)][/ARCH[/VARIANT]]`` or ``ARCH``.

    A single word is an OS (with this machine's architecture) when it names one known
    to containerd, else an architecture it knows (of Linux); ``local`` (buildx) is this
    machine's platform. ``linux/arm`` parses without a variant, ``linux/arm64/v8`` keeps
    its ``v8``: normalize() makes the two canonical.
    """
    raw = text.strip()
    if raw == "local":
        return _host_platform()
    if "*" in raw:
        raise DockbuildError(f"invalid platform {text!r}: wildcards not yet supported", hint=_HINT)
    parts = raw.split("/")
    head = re.fullmatch(_OS_RE, parts[0])
    if head is None or len(parts) > 3 or not all(re.fullmatch(_PART_RE, p) for p in parts[1:]):
        raise DockbuildError(f"invalid platform {text!r}", hint=_HINT)
    os_name = head.group(1).lower()
    os_name = "darwin" if os_name == "macos" else os_name
    os_version = unquote(head.group(2) or "")
    features = tuple(unquote(f) for f in (head.group(3) or "").split("+") if f)
    if len(parts) == 1:
        if os_name in _KNOWN_OS:
            local = _host_platform()
            variant = local.variant if local.architecture == "arm" and local.variant != "v7" else ""
            return Platform(os_name, local.architecture, variant, os_version, features)
        arch, variant = normalize_arch(parts[0], "")
        if arch not in _KNOWN_ARCH:
            raise DockbuildError(
                f"invalid platform {text!r}: unknown operating system or architecture", hint=_HINT
            )
        return Platform("linux", arch, "" if (arch, variant) == ("arm", "v7") else variant)
    if len(parts) == 2:
        arch, variant = normalize_arch(parts[1], "")
        if (arch, variant) == ("arm", "v7"):
            variant = ""
        return Platform(os_name, arch, variant, os_version, features)
    arch, variant = normalize_arch(parts[1], parts[2])
    if arch == "arm64" and not variant:
        variant = "v8"
    return Platform(os_name, arch, variant, os_version, features)


def normalize(text: str) -> str:
    """A platform as the user writes it -> its canonical name, as BuildKit and buildx
    make it (containerd's Normalize of its Parse): ``linux/arm64``, ``linux/arm/v7``."""
    return str(normalized(parse(text)))


def normalize_parts(
    os_name: str, arch: str, variant: str = "", os_version: str = "", os_features: tuple[str, ...] = ()
) -> str:
    """An image config's or index entry's platform fields -> the canonical name."""
    return str(normalized(Platform(os_name, arch, variant, os_version, os_features)))


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


def compatible(platform: str) -> list[str]:
    """containerd's Only matcher (platformVector): the platforms an image of which runs
    where ``platform`` is asked, best first. amd64/vN runs vN..v1, then 386; arm/vN runs
    vN..v5; arm64 runs its own variants (v9.x also v8.(x+5)), then arm/v8..v5."""
    wanted = normalized(parse(platform))
    return [str(normalized(p)) for p in _vector(wanted)]


def _vector(p: Platform) -> list[Platform]:
    def like(arch: str, variant: str) -> Platform:
        return Platform(p.os, arch, variant, p.os_version, p.os_features)

    out = [p]
    version = _variant_number(p.variant)
    if p.architecture == "amd64":
        if version is not None and version > 1:
            out += [like("amd64", f"v{v}") for v in range(version - 1, 0, -1)]
        out.append(like("386", ""))
    elif p.architecture == "arm":
        if version is not None and version > 5:
            out += [like("arm", f"v{v}") for v in range(version - 1, 4, -1)]
    elif p.architecture == "arm64":
        variant = p.variant or "v8"
        if variant not in _ARM64_RUNS:
            return []  # containerd's vector is empty too: nothing matches
        out = [
            like("arm64", f"v{major}" if minor == 0 else f"v{major}.{minor}")
            for major, newest in _ARM64_RUNS.get(variant, ())
            for minor in range(newest, -1, -1)
        ]
        arm = "v8" if variant.startswith(("v8", "v9")) else variant
        out += _vector(like("arm", arm))
    return out


def _variant_number(variant: str) -> int | None:
    digits = variant.removeprefix("v")
    return int(digits) if digits.isdigit() else None


def split(platform: str) -> tuple[str, str, str]:
    """``linux/arm/v7`` -> (os, architecture, variant)."""
    os_name, _, rest = platform.partition("/")
    arch, _, variant = rest.partition("/")
    return os_name, arch, variant


def path_name(platform: str) -> str:
    """The directory (or tar prefix) BuildKit names a platform's result: ``linux_arm64``."""
    return platform.replace("/", "_")
