"""Did-you-mean suggestions (BuildKit's util/suggest): the closest of a set of names."""

from __future__ import annotations

from collections.abc import Iterable


def closest(value: str, options: Iterable[str], case_sensitive: bool = True) -> str:
    """The option at most two edits away from ``value`` ("" when none is, or when ``value``
    is one of the options)."""
    original = value
    if not case_sensitive:
        value = value.lower()
    best, best_distance = "", 3  # at most two edits away, as BuildKit (and HCL) suggest
    for option in options:
        candidate = option if case_sensitive else option.lower()
        if candidate == value:
            return ""
        distance = _levenshtein(value, candidate)
        if distance < best_distance:
            best, best_distance = candidate, distance
    if not case_sensitive and best and original == original.upper():
        return best.upper()  # BuildKit's matchCase: in the case the value was written in
    return best


def with_suggestion(
    message: str, value: str, options: Iterable[str], case_sensitive: bool = True
) -> str:
    """``message`` with ` (did you mean X?)` when an option is close to ``value``."""
    match = closest(value, options, case_sensitive)
    return f"{message} (did you mean {match}?)" if match else message


def suggest(name: str, options: Iterable[str]) -> str:
    """The closest of ``options`` (deduplicated, in sorted order), case-sensitive."""
    return closest(name, sorted(set(options)), True)


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]
