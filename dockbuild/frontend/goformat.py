"""Go's text formats, as BuildKit writes and reads them: strconv quoting, fmt's %v/%q of a
[]string, time.Duration, strconv.ParseBool and go-units sizes."""

from __future__ import annotations

import re

_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}


def go_quote(text: str) -> str:
    """Go's strconv.Quote: a double-quoted string with Go escapes for the unprintable."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'  # nothing to escape (the common case)
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:
            # A byte that was not valid UTF-8 (kept by surrogateescape).
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def go_quote_list(items: list[str]) -> str:
    """Go's %q of a []string: ["a" "b"] (how BuildKit writes CMD/ENTRYPOINT history)."""
    return "[" + " ".join(go_quote(i) for i in items) + "]"


def go_list(items: list[str]) -> str:
    """Go's %v of a []string: [a b] (VOLUME, SHELL, EXPOSE history)."""
    return "[" + " ".join(items) + "]"


def go_duration(ns: int) -> str:
    """Go's time.Duration.String(): 0s, 500ms, 1.5s, 1m30s, 1h0m0s."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < 1_000:
        return f"{sign}{u}ns"
    if u < 1_000_000:
        return sign + _fraction(u, 1_000) + "\u00b5s"
    if u < 1_000_000_000:
        return sign + _fraction(u, 1_000_000) + "ms"
    seconds = _fraction(u % 60_000_000_000, 1_000_000_000) + "s"
    minutes_total = u // 60_000_000_000
    hours, minutes = divmod(minutes_total, 60)
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return sign + seconds


def _fraction(value: int, unit: int) -> str:
    whole, rest = divmod(value, unit)
    if not rest:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}." + f"{rest:0{digits}d}".rstrip("0")


_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


_DURATION_NUMBER_RE = re.compile(r"([0-9]*)(?:\.([0-9]*))?")


def parse_go_duration(text: str) -> int:
    """Go's time.ParseDuration (`1h30m`, `1.5s`, `300ms`, `0`) in nanoseconds.

    Raises ValueError with Go's message for anything Go would refuse.
    """
    original = text
    negative = False
    if text and text[0] in "+-":
        negative = text[0] == "-"
        text = text[1:]
    if text == "0":
        return 0
    if text == "":
        raise ValueError(f"time: invalid duration {original!r}")
    total = 0
    while text:
        match = _DURATION_NUMBER_RE.match(text)
        assert match is not None  # the pattern matches the empty string
        whole, fraction = match.group(1), match.group(2)
        if not whole and not fraction:
            raise ValueError(f"time: invalid duration {original!r}")
        text = text[match.end() :]
        end = 0
        while end < len(text) and text[end] not in ".0123456789":
            end += 1
        if end == 0:
            raise ValueError(f"time: missing unit in duration {original!r}")
        unit = text[:end]
        text = text[end:]
        scale = _DURATION_UNITS.get(unit)
        if scale is None:
            raise ValueError(f"time: unknown unit {unit!r} in duration {original!r}")
        value = int(whole or "0") * scale
        if fraction:
            value += int(fraction) * scale // 10 ** len(fraction)
        total += value
        if total > 2**63 - 1 + (1 if negative else 0):
            raise ValueError(f"time: invalid duration {original!r}")
    return -total if negative else total


def parse_go_bool(value: str) -> bool | None:
    """strconv.ParseBool's spellings; None for anything else."""
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    return None


def parse_uint32(value: str, base: int) -> int | None:
    """An unsigned 32-bit number in base 8 or 10 (strconv.ParseUint); None if it is not."""
    digits = "01234567" if base == 8 else "0123456789"
    if not value or any(ch not in digits for ch in value):
        return None
    number = int(value, base)
    return number if number < 2**32 else None


_RAM_RE = re.compile(r"([0-9]+(?:\.[0-9]+)*) ?([kKmMgGtTpP])?[iI]?[bB]?")


def parse_ram_in_bytes(value: str) -> int | None:
    """A size such as `64m`, `1.5GiB` or `512` in bytes (docker/go-units RAMInBytes)."""
    match = _RAM_RE.fullmatch(value)
    if match is None:
        return None
    try:
        number = float(match.group(1))
    except ValueError:
        return None
    power = " kmgtp".index(match.group(2).lower()) if match.group(2) else 0
    return int(number * 1024**power)
