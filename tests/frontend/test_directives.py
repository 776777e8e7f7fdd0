"""Parser directives: syntax, escape and check at the top of a Dockerfile."""

from __future__ import annotations

import pytest

from dockbuild.errors import DockerfileError
from dockbuild.frontend.directives import (
    CheckConfig,
    detect_syntax,
    parse_check,
    parse_directives,
    strip_bom,
)
from dockbuild.frontend.parser import dump, parse


def test_all_three_directives_are_read_in_any_order() -> None:
    text = "# check=skip=all\n# syntax=docker/dockerfile:1\n# escape=`\nFROM a\n"

    assert parse_directives(text) == {
        "check": "skip=all",
        "syntax": "docker/dockerfile:1",
        "escape": "`",
    }


def test_directive_keys_are_case_insensitive_and_values_keep_case() -> None:
    assert parse_directives("# SyNtAx = Docker/Dockerfile:1  \nFROM a\n") == {
        "syntax": "Docker/Dockerfile:1"
    }


def test_directives_stop_at_the_first_empty_line() -> None:
    assert parse_directives("# syntax=a\n\n# escape=`\nFROM a\n") == {"syntax": "a"}


def test_directives_stop_at_an_ordinary_comment() -> None:
    assert parse_directives("# hello\n# escape=`\nFROM a\n") == {}


def test_unknown_directive_ends_the_directive_block() -> None:
    assert parse_directives("# foo=bar\n# escape=`\nFROM a\n") == {}


def test_repeated_directive_is_an_error_naming_its_line() -> None:
    with pytest.raises(DockerfileError, match="only one escape parser directive") as caught:
        parse("# escape=`\n# escape=\\\nFROM a\n")

    assert caught.value.location is not None
    assert caught.value.location.start_line == 2


def test_escape_accepts_only_backtick_or_backslash() -> None:
    with pytest.raises(DockerfileError, match="invalid escape token"):
        parse("# escape=x\nFROM a\n")


def test_backtick_escape_changes_the_continuation_token() -> None:
    result = parse("# escape=`\nFROM a\nRUN echo `\n  hi\nENV P=C:\\Windows\n")

    assert result.escape_token == "`"
    assert dump(result).splitlines()[1:] == ['(run "echo   hi")', '(env "P" "C:\\\\Windows" "=")']


def test_bom_is_stripped_before_the_first_instruction() -> None:
    result = parse("\ufeffFROM a\n".encode())

    assert dump(result) == '(from "a")'


def test_bom_does_not_hide_a_directive() -> None:
    assert parse("\ufeff# escape=`\nFROM a\n").escape_token == "`"
    assert strip_bom("\ufeffx") == "x"


def test_detect_syntax_skips_a_shebang_and_takes_the_first_word() -> None:
    assert detect_syntax("#!/usr/bin/env dockbuild\n# syntax=docker/dockerfile:1 arg\n") == (
        "docker/dockerfile:1"
    )


def test_detect_syntax_accepts_slash_comments_and_json() -> None:
    assert detect_syntax("// syntax=example/frontend\nfoo\n") == "example/frontend"
    assert detect_syntax('{"syntax": "example/json"}') == "example/json"
    assert detect_syntax("FROM a\n") is None


def test_check_directive_parses_skip_list_and_error_flag() -> None:
    assert parse_check("skip=JSONArgsRecommended, StageNameCasing;error=true") == CheckConfig(
        skip=("JSONArgsRecommended", "StageNameCasing"), error=True
    )
    assert parse_check("skip=all") == CheckConfig(skip_all=True)


def test_check_directive_rejects_unknown_options() -> None:
    with pytest.raises(DockerfileError, match="invalid check option"):
        parse_check("frobnicate=1")
    with pytest.raises(DockerfileError, match="not a boolean"):
        parse_check("error=maybe")
