"""Word expansion (dockbuild.frontend.shell): modifiers, quoting, flags and error messages."""

from __future__ import annotations

import pytest

from dockbuild.frontend.shell import Lex, ShellError, env_from_list


def expand(word: str, env: dict[str, str] | None = None, escape: str = "\\") -> str:
    return Lex(escape).process_word(word, env or {})


def error_reason(word: str, env: dict[str, str] | None = None, lex: Lex | None = None) -> str:
    with pytest.raises(ShellError) as caught:
        (lex or Lex()).process_word(word, env or {})
    return caught.value.reason


# --- plain references ---------------------------------------------------------------


def test_dollar_name_and_braced_name_expand() -> None:
    assert expand("$A/${A}", {"A": "x"}) == "x/x"


def test_unset_variable_expands_to_nothing() -> None:
    assert expand("a${NOPE}b$NOPE", {}) == "ab"


def test_name_stops_at_first_non_name_character() -> None:
    assert expand("$A.txt $A_B", {"A": "x", "A_B": "y"}) == "x.txt y"


def test_names_are_case_sensitive() -> None:
    assert expand("$path", {"PATH": "/bin"}) == ""


def test_lone_dollar_is_literal() -> None:
    assert expand("cost: $ 5 $", {}) == "cost: $ 5 $"


def test_positional_parameter_reads_digits_only() -> None:
    assert expand("$1x ${10}y", {"1": "one"}) == "onex y"


@pytest.mark.parametrize("special", list("@*#?-$!0"))
def test_special_parameter_is_a_one_character_name(special: str) -> None:
    assert expand(f"${special}rest", {}) == "rest"


# --- modifiers ----------------------------------------------------------------------

SET = {"V": "value", "EMPTY": ""}


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("${V:-d}", "value"),
        ("${EMPTY:-d}", "d"),
        ("${UNSET:-d}", "d"),
        ("${V-d}", "value"),
        ("${EMPTY-d}", ""),
        ("${UNSET-d}", "d"),
    ],
)
def test_default_modifier_colon_also_replaces_empty(word: str, expected: str) -> None:
    assert expand(word, SET) == expected


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("${V:+alt}", "alt"),
        ("${EMPTY:+alt}", ""),
        ("${UNSET:+alt}", ""),
        ("${V+alt}", "alt"),
        ("${EMPTY+alt}", "alt"),
        ("${UNSET+alt}", ""),
    ],
)
def test_alternative_modifier_colon_also_skips_empty(word: str, expected: str) -> None:
    assert expand(word, SET) == expected


def test_required_modifier_passes_set_values_through() -> None:
    assert expand("${V:?} ${V?} ${EMPTY?}", SET) == "value value "


@pytest.mark.parametrize(
    ("word", "reason"),
    [
        ("${UNSET:?}", "UNSET: is not allowed to be unset"),
        ("${UNSET?}", "UNSET: is not allowed to be unset"),
        ("${EMPTY:?}", "EMPTY: is not allowed to be empty"),
        ("${UNSET:?set it with --build-arg}", "UNSET: set it with --build-arg"),
        ("${EMPTY:?need $V}", "EMPTY: need value"),
    ],
)
def test_required_modifier_error_names_variable_and_message(word: str, reason: str) -> None:
    assert error_reason(word, SET) == reason


@pytest.mark.parametrize(
    ("word", "value", "expected"),
    [
        ("${F#*/}", "a/b/c", "b/c"),
        ("${F##*/}", "a/b/c", "c"),
        ("${F%/*}", "a/b/c", "a/b"),
        ("${F%%/*}", "a/b/c", "a"),
        ("${F#x}", "a/b/c", "a/b/c"),
        ("${F#}", "xxyy", "xxyy"),
        ("${F#*}", "xxyy", "xxyy"),
        ("${F##*x}", "xxyy", "yy"),
        ("${F#*x*y}", "xxyy", "y"),
        ("${F#?\\?}", "???y", "?y"),
        ("${F%%\\**}", "xx**", "xx"),
        ("${F%%\\**\\*}", "a***yy*", "a"),
        ("${F%.tar.gz}", "pkg.tar.gz", "pkg"),
    ],
)
def test_trim_modifiers_match_shortest_or_longest_glob(
    word: str, value: str, expected: str
) -> None:
    assert expand(word, {"F": value}) == expected


def test_trim_pattern_treats_regex_characters_and_brackets_literally() -> None:
    # Like BuildKit: no bracket expressions, `\}` gets a brace through ${...}.
    env = {"F": "()[]{}^$.*?|\\x"}
    assert expand("${F#()[]{\\}^$.\\*\\?|\\\\}", env) == "x"
    assert expand("${F#[(]}", {"F": "(x"}) == "(x"
    assert expand("${F#[(]}", {"F": "[(]x"}) == "x"


def test_trim_pattern_may_come_from_a_variable() -> None:
    assert expand("${F#$P}", {"F": "xxyy", "P": "x"}) == "xyy"
    assert expand("${F%%$P}", {"F": "xxyy", "P": ""}) == "xxyy"


def test_trim_of_unset_variable_is_empty() -> None:
    assert expand("[${NOPE%x}]", {}) == "[]"


@pytest.mark.parametrize(
    ("word", "env", "expected"),
    [
        ("${F/o/0}", {"F": "foo"}, "f0o"),
        ("${F//o/0}", {"F": "foo"}, "f00"),
        ("${F/x/0}", {"F": "foo"}, "foo"),
        ("${F//o}", {"F": "foo"}, None),
        (
            "${F/$N/.} - ${F//$N/.}",
            {"F": "/foo*/*/*.txt", "N": "\\*/"},
            "/foo.*/*.txt - /foo..*.txt",
        ),
        ("${F/$N/} - ${F//$N/}", {"F": "/tmp/tmp/bar.txt", "N": "/tmp"}, "/tmp/bar.txt - /bar.txt"),
        ("${F//\\//\\/}", {"F": "/tmp/foo.txt"}, "\\/tmp\\/foo.txt"),
        ("${F/http:\\/\\//https:\\/\\/}", {"F": "http://x"}, "https:\\/\\/x"),
        ("${F/?/_}", {"F": "abc"}, "_bc"),
        ("${F//*/x}", {"F": "abc"}, "x"),
        ("${F///}", {"F": "xxyy"}, "xxyy"),
        ("${F/$E/ww}", {"F": "xxyy", "E": ""}, "wwxxyy"),
        ("${F//$E/-}", {"F": "ab", "E": ""}, "-a-b-"),
        ("${F//b/<$$0>}", {"F": "abc"}, "a<0>c"),  # $$ is the (unset) special parameter
    ],
)
def test_replace_modifiers_replace_first_or_every_match(
    word: str, env: dict[str, str], expected: str | None
) -> None:
    if expected is None:
        assert error_reason(word, env) == "syntax error: missing '/' in ${}"
    else:
        assert expand(word, env) == expected


def test_replace_all_expands_dollar_zero_like_go_regexp() -> None:
    # BuildKit hands the replacement to Go's ReplaceAllString, where $0 is the match.
    assert expand("${F//b/[\\$0]}", {"F": "abc"}) == "a[\\b]c"
    assert expand("${F/b/[\\$0]}", {"F": "abc"}) == "a[\\$0]c"


def test_replace_of_unset_variable_is_empty() -> None:
    assert expand("[${NOPE//a/b}]", {}) == "[]"


# --- nesting ------------------------------------------------------------------------


def test_modifier_word_may_nest_expansions() -> None:
    env = {"PWD": "/home"}
    assert expand("${A:-${B:-${PWD}}}", env) == "/home"
    assert expand("${PWD:+${PWD}:}x", env) == "/home:x"
    assert expand("${A:-$PWD/bin}", env) == "/home/bin"


def test_nested_expansion_is_the_platform_release_pattern() -> None:
    word = "app-${V}.${OS}-${ARCH}${VARIANT:+-${VARIANT}}.tar.gz"
    env = {"V": "v1", "OS": "linux", "ARCH": "arm", "VARIANT": "v7"}
    assert expand(word, env) == "app-v1.linux-arm-v7.tar.gz"
    del env["VARIANT"]
    assert expand(word, env) == "app-v1.linux-arm.tar.gz"


def test_quotes_inside_modifier_word_are_processed() -> None:
    assert expand("${A:-'a b'}", {}) == "a b"
    assert expand('${A:-"$B c"}', {"B": "b"}) == "b c"


def test_escaped_dollar_in_modifier_word_is_literal() -> None:
    assert expand("he${X:-\\${PWD}z}xx", {"PWD": "/home"}) == "he${PWDz}xx"


def test_brace_after_complete_expansion_is_literal() -> None:
    assert expand("${A}}", {"A": "a"}) == "a}"


# --- quotes and escapes ---------------------------------------------------------------


def test_single_quotes_keep_everything_literal() -> None:
    assert expand("'$A \\n \"x\"'", {"A": "a"}) == '$A \\n "x"'


def test_double_quotes_expand_and_escape_only_quote_dollar_and_escape() -> None:
    assert expand('"$A \\$A \\" \\\\ \\t"', {"A": "a"}) == 'a $A " \\ \\t'


def test_escape_outside_quotes_escapes_any_character() -> None:
    assert expand("a\\ b\\$A\\'\\t", {"A": "a"}) == "a b$A't"


def test_trailing_escape_is_dropped() -> None:
    assert expand("abc\\", {}) == "abc"


def test_backtick_escape_token_escapes_and_backslash_is_literal() -> None:
    env = {"A": "a"}
    assert expand("C:\\path\\$A", env, escape="`") == "C:\\path\\a"
    assert expand("`$A", env, escape="`") == "$A"
    assert expand('"x`"y"', env, escape="`") == 'x"y'
    assert expand('"``"', env, escape="`") == "`"


def test_backtick_escape_token_leaves_backslash_pattern_escape() -> None:
    # The glob escape inside ${v#...} is a backslash whatever the escape token is.
    assert expand("${F#\\*}", {"F": "*x"}, escape="`") == "x"


def test_unicode_passes_through() -> None:
    assert expand("안'녕'$K", {"K": "한국어"}) == "안녕한국어"


def test_leading_byte_order_mark_is_ignored() -> None:
    # Go's text/scanner, which BuildKit scans with, drops it.
    assert expand("\ufeff$A", {"A": "a"}) == "a"


# --- flags ----------------------------------------------------------------------------


def test_raw_quotes_keeps_quote_characters() -> None:
    lex = Lex()
    lex.raw_quotes = True
    assert lex.process_word("a'$A'\"$A\"", {"A": "x"}) == "a'$A'\"x\""


def test_raw_escapes_keeps_escape_tokens() -> None:
    lex = Lex()
    lex.raw_escapes = True
    assert lex.process_word("a\\$A\\ b", {"A": "x"}) == "a\\$A\\ b"


def test_skip_process_quotes_treats_quotes_as_text() -> None:
    lex = Lex()
    lex.skip_process_quotes = True
    assert lex.process_word("'$A' \"$A", {"A": "x"}) == "'x' \"x"


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("$U", "$U"),
        ("${U}", "${U}"),
        ("${U:-d}", "${U:-d}"),
        ("${U-$S}", "${U-s}"),
        ("${U:?msg}", "${U:?msg}"),
        ("${U#x*}", "${U#x*}"),
        ("${U//a/b}", "${U/a/b}"),
        ("$S ${S:-d}", "s s"),
    ],
)
def test_skip_unset_env_leaves_unset_references_as_written(word: str, expected: str) -> None:
    lex = Lex()
    lex.skip_unset_env = True
    assert lex.process_word(word, {"S": "s"}) == expected


# --- matches -------------------------------------------------------------------------


def test_with_matches_reports_set_and_unset_names() -> None:
    lex = Lex()
    word = "${FOO:-aaa} ${BAR:-bbb} ${BAZ:-ccc}"
    result, matched, unmatched = lex.process_word_with_matches(word, {"FOO": "xxx", "BAR": ""})
    assert result == "xxx bbb ccc"
    assert matched == {"FOO", "BAR"}
    assert unmatched == {"BAZ"}


def test_with_matches_reports_names_read_inside_modifiers() -> None:
    lex = Lex()
    _, matched, unmatched = lex.process_word_with_matches("${A:-$B}${C#$D}", {"C": "c"})
    assert matched == {"C"}
    assert unmatched == {"A", "B", "D"}


def test_with_matches_on_plain_word_reports_nothing() -> None:
    assert Lex().process_word_with_matches("plain", {"A": "a"}) == ("plain", set(), set())


def test_with_matches_ignores_quoted_and_escaped_references() -> None:
    _, matched, unmatched = Lex().process_word_with_matches("'$A' \\$B", {})
    assert matched == set()
    assert unmatched == set()


# --- words ---------------------------------------------------------------------------


def test_process_words_splits_on_unquoted_space_after_expansion() -> None:
    lex = Lex()
    env = {"P": "80  443"}
    assert lex.process_words("$P 8080/udp", env) == ["80", "443", "8080/udp"]
    assert lex.process_words('"$P" x\\ y', env) == ["80  443", "x y"]


def test_process_words_drops_empty_quoted_words() -> None:
    assert Lex().process_words('a "" b', {}) == ["a", "b"]


def test_process_words_keeps_word_around_nested_modifier() -> None:
    # BuildKit 1.26 loses "hello" here (a shared buffer is reset by the nested scan);
    # we keep the word whole.
    assert Lex().process_words("hello${X:-x y}bye", {}) == ["hellox", "ybye"]


def test_process_words_splits_only_on_go_white_space() -> None:
    # U+001C is white space to str.isspace() but not to Go's unicode.IsSpace.
    assert Lex().process_words("a\x1cb\u3000c", {}) == ["a\x1cb", "c"]


def test_process_words_of_empty_word_is_empty_list() -> None:
    assert Lex().process_words("", {}) == []
    assert Lex().process_words("$NOPE", {}) == []


# --- env forms -----------------------------------------------------------------------


def test_env_list_later_entry_wins_and_bare_name_is_set_empty() -> None:
    assert env_from_list(["A=1", "B", "A=2=x"]) == {"A": "2=x", "B": ""}
    assert Lex().process_word("${A}${B?}", ["A=1", "B", "A=2"]) == "2"


def test_env_may_be_any_object_with_get() -> None:
    class Scope:
        def get(self, name: str, /) -> str | None:
            return name.lower() if name.isupper() else None

    result, matched, unmatched = Lex().process_word_with_matches("$ABC-$def", Scope())
    assert result == "abc-"
    assert (matched, unmatched) == ({"ABC"}, {"def"})


def test_env_as_plain_string_is_refused() -> None:
    with pytest.raises(TypeError):
        Lex().process_word("$A", "A=1")  # type: ignore[arg-type]


def test_escape_token_must_be_one_character() -> None:
    with pytest.raises(ValueError):
        Lex("")


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "reason"),
    [
        ("${}", "syntax error: bad substitution"),
        ("${:}", "syntax error: bad substitution"),
        ("${:-x}", "syntax error: bad substitution"),
        ("${{a}", "syntax error: bad substitution"),
        ("${", "syntax error: missing '}'"),
        ("${A", "syntax error: missing '}'"),
        ("${A:-x", "syntax error: missing '}'"),
        ("${A:-${B}", "syntax error: missing '}'"),
        ("${A:-'x}", "syntax error: missing '}'"),
        ("${.}", "unsupported modifier (.) in substitution"),
        ("${A=x}", "unsupported modifier (=) in substitution"),
        ("${A:=x}", "unsupported modifier (:=) in substitution"),
        ("${A:x}", "unsupported modifier (:x) in substitution"),
        ("${A:#x}", "unsupported modifier (:#) in substitution"),
        ("${A:%x}", "unsupported modifier (:%) in substitution"),
        ("'abc", "unexpected end of statement while looking for matching single-quote"),
        ('"abc', "unexpected end of statement while looking for matching double-quote"),
        ('"abc\\"', "unexpected end of statement while looking for matching double-quote"),
        ("${A#\\x}", "invalid pattern (\\x) in substitution: invalid escape '\\x'"),
        ("${A/\\x/y}", "invalid pattern (\\x) in substitution: invalid escape '\\x'"),
    ],
)
def test_error_reasons_match_buildkit(word: str, reason: str) -> None:
    assert error_reason(word, {"A": "a"}) == reason


def test_error_message_names_the_word_like_buildkit() -> None:
    with pytest.raises(ShellError) as caught:
        Lex().process_word('x"${V:?must be set}', {})
    assert str(caught.value) == 'failed to process "x\\"${V:?must be set}": V: must be set'
    assert caught.value.word == 'x"${V:?must be set}'
    assert isinstance(caught.value, ValueError)


def test_inner_error_before_outer_brace_keeps_its_reason() -> None:
    assert error_reason("${A:-${B:?no B}}", {}) == "B: no B"
