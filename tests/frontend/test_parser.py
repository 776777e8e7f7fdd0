"""Line assembly, heredocs, flags and argument forms that BuildKit's test files do not cover."""

from __future__ import annotations

import pytest

from dockbuild.errors import DockerfileError
from dockbuild.frontend.parser import (
    Heredoc,
    chomp_heredoc_content,
    dump,
    parse,
    parse_heredoc,
    split_command,
)


def _only(text: str):
    result = parse(text)
    return result.children[-1]


# --- continuations and comments --------------------------------------------------------


def test_escaped_escape_at_line_end_does_not_continue() -> None:
    result = parse("FROM a\nENV C x\\\\\nENV D y\n")

    assert [node.value for node in result.children] == ["from", "env", "env"]


def test_trailing_escape_at_end_of_file_still_yields_the_instruction() -> None:
    assert dump(parse("FROM a\nRUN echo \\")) == '(from "a")\n(run "echo")'


def test_comment_lines_inside_a_continuation_are_skipped() -> None:
    node = _only("FROM a\nRUN echo 1 \\\n  # a comment\n  echo 2\n")

    assert node.args == ["echo 1   echo 2"]
    assert (node.start_line, node.end_line) == (2, 4)


def test_empty_continuation_line_is_skipped_with_a_warning() -> None:
    result = parse("FROM a\nRUN echo 1 \\\n\n  echo 2\n")

    assert result.children[1].args == ["echo 1   echo 2"]
    assert len(result.warnings) == 1
    warning = result.warnings[0]
    assert warning.rule == "NoEmptyContinuation"
    assert warning.short == "Empty continuation line found in: RUN echo 1   echo 2"
    assert "future release" in warning.detail
    assert warning.line == 4


def test_continuation_lines_keep_their_leading_white_space() -> None:
    assert _only("RUN a \\\n    b\n").args == ["a     b"]


def test_comments_directly_above_an_instruction_become_prev_comment() -> None:
    result = parse("FROM a\n# first\n# second\nRUN x\nRUN y\n")

    assert result.children[1].prev_comment == ["first", "second"]
    assert result.children[2].prev_comment == []


def test_hash_in_the_middle_of_a_line_is_not_a_comment() -> None:
    assert _only("RUN echo a # b\n").args == ["echo a # b"]


def test_line_numbers_cover_the_whole_instruction() -> None:
    result = parse("\n\nFROM a\nRUN a \\\n b \\\n c\n")

    assert [(n.start_line, n.end_line) for n in result.children] == [(3, 3), (4, 6)]


def test_crlf_line_endings_are_accepted() -> None:
    assert dump(parse("FROM a\r\nRUN b \\\r\n c\r\n")) == '(from "a")\n(run "b  c")'


def test_file_with_only_comments_and_blank_lines_is_an_error() -> None:
    with pytest.raises(DockerfileError, match="file with no instructions"):
        parse("# nothing\n\n")


def test_instruction_words_are_case_insensitive() -> None:
    assert dump(parse("from a\nRuN b\n")) == '(from "a")\n(run "b")'


# --- flags -----------------------------------------------------------------------------


def test_flags_are_split_off_with_quotes_removed() -> None:
    node = _only('RUN --mount="type=cache,target=/x" --network=none echo hi\n')

    assert node.flags == ["--mount=type=cache,target=/x", "--network=none"]
    assert node.args == ["echo hi"]


def test_double_dash_ends_the_flags() -> None:
    node = _only("COPY --chown=1 -- --weird /dst\n")

    assert node.flags == ["--chown=1"]
    assert node.args == ["--weird", "/dst"]


def test_split_command_returns_word_flags_and_rest() -> None:
    assert split_command("  COPY  --from=b  a  b ") == ("COPY", ["--from=b"], "a  b")


# --- argument forms --------------------------------------------------------------------


def test_exec_form_is_a_json_array_of_strings() -> None:
    node = _only('CMD ["a", "b c"]\n')

    assert node.json is True
    assert node.args == ["a", "b c"]


def test_invalid_json_falls_back_to_shell_form() -> None:
    node = _only('CMD ["a", b]\n')

    assert node.json is False
    assert node.args == ['["a", b]']


def test_json_array_of_non_strings_is_an_error() -> None:
    with pytest.raises(DockerfileError, match="arrays must be comprised of strings only"):
        parse("RUN [1, 2]\n")


def test_json_form_list_instructions_split_shell_form_on_white_space() -> None:
    assert _only("VOLUME /a  /b\n").args == ["/a", "/b"]
    assert _only('VOLUME ["/a b"]\n').args == ["/a b"]


def test_env_new_form_keeps_quotes_for_the_expander() -> None:
    assert _only('ENV a="x y" b=z\n').args == ["a", '"x y"', "=", "b", "z", "="]


def test_env_legacy_form_takes_the_rest_of_the_line_as_value() -> None:
    assert _only("ENV a  x y  z\n").args == ["a", "x y  z", ""]


def test_env_new_form_word_without_equals_is_an_error() -> None:
    with pytest.raises(DockerfileError, match='can\'t find = in "b"'):
        parse("ENV a=1 b\n")


def test_arg_words_keep_their_equals_signs() -> None:
    assert _only('ARG a b="c d"\n').args == ["a", 'b="c d"']


def test_healthcheck_separates_the_type_from_the_command() -> None:
    node = _only("HEALTHCHECK --interval=5s CMD curl -f http://x/\n")

    assert node.flags == ["--interval=5s"]
    assert node.args == ["CMD", "curl -f http://x/"]


def test_onbuild_wraps_its_instruction() -> None:
    node = _only("ONBUILD COPY --from=x a b\n")

    assert node.args == []
    assert node.sub is not None
    assert (node.sub.value, node.sub.flags, node.sub.args) == ("copy", ["--from=x"], ["a", "b"])
    assert dump(parse("ONBUILD COPY --from=x a b\n")) == ('(onbuild (copy ["--from=x"] "a" "b"))')


def test_unknown_instruction_parses_like_buildkits_parse_ignore() -> None:
    assert dump(parse("FROM a\nFOO bar\n")) == '(from "a")\n(foo "")'


# --- heredocs --------------------------------------------------------------------------


def test_run_heredoc_collects_the_body_up_to_the_delimiter() -> None:
    node = _only("FROM a\nRUN <<EOF\n# not a comment\necho hi\nEOF\n")

    assert node.heredocs == [Heredoc("EOF", "# not a comment\necho hi\n", True, False, 0)]
    assert node.args == ["<<EOF"]
    assert (node.start_line, node.end_line) == (2, 5)


def test_several_heredocs_on_one_line_are_read_in_order() -> None:
    node = _only("COPY <<X <<Y /dest\nY\nX\nX\nY\n")

    assert [(h.name, h.content) for h in node.heredocs] == [("X", "Y\n"), ("Y", "X\n")]


def test_dash_heredoc_matches_a_tab_indented_delimiter_and_keeps_raw_body() -> None:
    node = _only("RUN <<-EOT\n\tbaz\n\tEOT\n")

    assert node.heredocs == [Heredoc("EOT", "\tbaz\n", True, True, 0)]
    assert chomp_heredoc_content(node.heredocs[0].content) == "baz\n"


def test_quoted_delimiter_turns_expansion_off() -> None:
    for word in ("<<'EOF'", '<<"EOF"', '<<E"O"F', "<<-'EOF'"):
        heredoc = parse_heredoc(word)
        assert heredoc is not None and heredoc.name == "EOF" and not heredoc.expand, word


def test_file_descriptor_prefix_is_recorded() -> None:
    assert _only("RUN 3<<EOF cat\nx\nEOF\n").heredocs[0].file_descriptor == 3


def test_words_that_do_not_start_a_heredoc() -> None:
    for word in ("", "EOF", "<<", "<<-", "<EOF", "<<<EOF", "a<<EOF"):
        assert parse_heredoc(word) is None, word


def test_unterminated_quote_in_a_delimiter_is_an_error() -> None:
    for word in ("<<'EOF", '<<"EOF', "<<EOF'"):
        with pytest.raises(ValueError):
            parse_heredoc(word)


def test_quoted_heredoc_word_in_the_line_is_not_a_heredoc() -> None:
    assert _only("RUN '<<EOF'\n").heredocs == []
    assert _only('RUN "<<EOF"\n').heredocs == []


def test_exec_form_has_no_heredocs() -> None:
    result = parse('FROM a\nRUN ["<<EOF"]\nEOF\n')

    assert result.children[1].heredocs == []
    assert [n.value for n in result.children] == ["from", "run", "eof"]


def test_heredocs_only_for_run_copy_add() -> None:
    result = parse("FROM a\nUSER <<X\nX\n")

    assert [n.value for n in result.children] == ["from", "user", "x"]


def test_onbuild_wrapped_run_takes_a_heredoc() -> None:
    node = _only("ONBUILD RUN <<EOF\necho hi\nEOF\n")

    assert node.heredocs == [Heredoc("EOF", "echo hi\n", True, False, 0)]


def test_unterminated_heredoc_is_an_error_at_the_instruction() -> None:
    with pytest.raises(DockerfileError, match="unterminated heredoc") as caught:
        parse("FROM a\nRUN <<EOF\necho hi\n")

    assert caught.value.location is not None
    assert caught.value.location.start_line == 2


# --- dump ------------------------------------------------------------------------------


def test_invalid_utf8_bytes_dump_as_hex_escapes() -> None:
    assert dump(parse(b"FROM a\xff\n")) == '(from "a\\xff")'
