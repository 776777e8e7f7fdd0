"""Go's text formats: strconv quoting, time.Duration both ways, go-units sizes."""

from __future__ import annotations

import pytest

from dockbuild.frontend.goformat import go_duration, go_quote, parse_go_duration, parse_ram_in_bytes


def test_go_quote_escapes_like_strconv_quote() -> None:
    assert go_quote('a"b\\c') == '"a\\"b\\\\c"'
    assert go_quote("\t\n\x00\x7f") == '"\\t\\n\\x00\\x7f"'
    assert go_quote("♥\u200b") == '"♥\\u200b"'


def test_go_duration_matches_go_formatting() -> None:
    assert [go_duration(n) for n in (0, 1, 1500, 2_500_000, 1_500_000_000, 90 * 10**9, 3600 * 10**9)] == [
        "0s", "1ns", "1.5\u00b5s", "2.5ms", "1.5s", "1m30s", "1h0m0s",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "nanoseconds"),
    [
        ("0", 0),
        ("1h30m", 5_400_000_000_000),
        ("1.5s", 1_500_000_000),
        (".5ms", 500_000),
        ("2us", 2_000),
        ("2µs", 2_000),
        ("-1m", -60_000_000_000),
        ("+3ns", 3),
    ],
)
def test_go_durations(text: str, nanoseconds: int) -> None:
    assert parse_go_duration(text) == nanoseconds


@pytest.mark.parametrize("text", ["", "1", "s", ".s", "1x", "1.2.3s", "-"])
def test_invalid_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="time: "):
        parse_go_duration(text)


def test_ram_sizes() -> None:
    assert parse_ram_in_bytes("512") == 512
    assert parse_ram_in_bytes("1k") == 1024
    assert parse_ram_in_bytes("1.5GiB") == 1536 * 1024 * 1024
    assert parse_ram_in_bytes("lots") is None
