"""Dockerfile text -> nodes: lines, continuations, comments, heredocs, flags and arguments.

This mirrors BuildKit's `frontend/dockerfile/parser` (parser.go, split_command.go,
line_parsers.go): the same line assembly, the same argument parser for each instruction,
and `dump()` gives the same s-expressions as BuildKit's `Node.Dump()`, so the behaviour is
pinned by BuildKit's own test data. Nothing here expands variables or checks meaning;
`instructions` does the checking and `shell` the expansion.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from dockbuild.errors import DockerfileError, Location
from dockbuild.frontend.directives import (
    DEFAULT_ESCAPE,
    GO_SPACE,
    DirectiveParser,
    is_go_space,
    strip_bom,
    validate_escape,
)
from dockbuild.frontend.goformat import go_quote

NO_EMPTY_CONTINUATION_URL = "https://docs.docker.com/go/dockerfile/rule/no-empty-continuation/"

# The separators BuildKit splits instruction words on (reWhitespace).
_WHITESPACE_RE = re.compile("[\t\v\f\r ]+")
# Go's `\s` and `\d` are ASCII-only, hence the explicit classes.
_HEREDOC_RE = re.compile("([0-9]*)<<(-?)[\t\n\f\r ]*([^<]*)")
_LEADING_TABS_RE = re.compile("^\t+", re.MULTILINE)

_HEREDOC_INSTRUCTIONS = frozenset({"add", "copy", "run"})
_HEREDOC_WRAPPERS = frozenset({"onbuild"})


@dataclass
class Heredoc:
    """A here-document attached to a RUN, COPY or ADD line.

    `content` is the raw body (every line with its newline, tabs not yet stripped even for
    `<<-`; see `chomp_heredoc_content`). `expand` is False when any part of the delimiter
    was quoted. `file_descriptor` is the digits before `<<` (0 if none).
    """

    name: str
    content: str = ""
    expand: bool = True
    chomp: bool = False
    file_descriptor: int = 0


@dataclass(slots=True)
class Node:
    """One instruction as the parser sees it; every string is a raw, unexpanded word.

    `value` is the lower-cased instruction word. `args` are the argument values in
    BuildKit's order (ENV and LABEL: name, value, and "=" or "" for the legacy `k v` form;
    HEALTHCHECK: the type word then the command). `sub` is ONBUILD's inner instruction.
    `flags` are the raw `--name=value` strings, quotes removed. `json` is True for the
    exec (JSON array) form. `original` is the logical line after continuations were joined.
    """

    value: str
    args: list[str] = field(default_factory=list)
    sub: Node | None = None
    flags: list[str] = field(default_factory=list)
    json: bool = False
    heredocs: list[Heredoc] = field(default_factory=list)
    original: str = ""
    start_line: int = 0
    end_line: int = 0
    prev_comment: list[str] = field(default_factory=list)


@dataclass
class ParseWarning:
    """A parse-time problem that does not stop the build (BuildKit's parser.Warning)."""

    short: str
    detail: str
    line: int
    rule: str = ""
    url: str = ""


@dataclass
class ParseResult:
    """The instructions of a Dockerfile, with the directives and warnings found on the way."""

    children: list[Node]
    escape_token: str
    directives: dict[str, str]
    warnings: list[ParseWarning]
    filename: str = "Dockerfile"


class _Directives:
    """The parse-time state that directives change: the escape token and continuation rule."""

    def __init__(self, filename: str) -> None:
        self.parser = DirectiveParser(filename=filename)
        self.filename = filename
        self.set_escape(DEFAULT_ESCAPE, 0)

    def set_escape(self, token: str, line: int) -> None:
        self.escape = validate_escape(token, filename=self.filename, line=line)
        e = re.escape(token)
        # An escape token at the end of a line continues it, unless the token is itself
        # escaped (`foo\\`); a token alone on a line continues too.
        self.continuation = re.compile(rf"([^{e}]){e}[ \t]*\Z|^{e}[ \t]*\Z")

    def feed(self, line: str) -> None:
        directive = self.parser.parse_line(line)
        if directive is not None and directive.name == "escape":
            self.set_escape(directive.value, directive.line)


def parse(text: str | bytes, filename: str = "Dockerfile") -> ParseResult:
    """Parse Dockerfile text into instruction nodes, exactly as BuildKit's parser does.

    Raises DockerfileError for input BuildKit rejects at this stage: an unterminated
    heredoc, a JSON array of non-strings, `ENV k` without a value, a repeated or invalid
    directive, or a file with no instructions.
    """
    if isinstance(text, bytes):
        # surrogateescape keeps invalid UTF-8 bytes round-trippable, as Go strings do.
        text = text.decode("utf-8", "surrogateescape")
    lines = _split_lines(strip_bom(text))
    directives = _Directives(filename)
    children: list[Node] = []
    warnings: list[ParseWarning] = []
    comments: list[str] = []
    current = 0
    index = 0

    def fail(message: str, start: int, end: int = 0) -> DockerfileError:
        return DockerfileError(message, location=Location(filename, start, end or start))

    def feed(token: str) -> None:
        # Directives are only looked for until the first line that is not one.
        try:
            directives.feed(token)
        except DockerfileError as err:
            raise fail(err.message, current + 1) from None

    seen = directives.parser
    n_lines = len(lines)
    while index < n_lines:
        raw = lines[index]
        index += 1
        token = raw.rstrip("\r\n").lstrip(GO_SPACE)
        if not seen.done:
            feed(token)
        if token.startswith("#"):
            # BuildKit drops the first character assuming it is the `#`.
            comment = _trim_space(raw[1:])
            comments = [] if comment == "" else [*comments, comment]
            current += 1
            continue
        current += 1
        start = current
        if token == "":
            continue
        if token.rstrip(" \t").endswith(directives.escape):
            line, end_of_line = _trim_continuation(token, directives)
            if end_of_line and line == "":
                continue
        else:  # the common case: a one-line instruction
            line, end_of_line = token, True

        has_empty_continuation = False
        while not end_of_line and index < n_lines:
            raw = lines[index]
            index += 1
            token = raw.rstrip("\r\n")
            if not seen.done:
                feed(token)
            current += 1
            trimmed = token.lstrip(GO_SPACE)
            if trimmed.startswith("#"):
                continue
            if trimmed == "":
                has_empty_continuation = True
                continue
            continued, end_of_line = _trim_continuation(token, directives)
            line += continued

        if has_empty_continuation:
            warnings.append(
                ParseWarning(
                    short=f"Empty continuation line found in: {line}",
                    detail="Empty continuation lines will become errors in a future release",
                    line=current,
                    rule="NoEmptyContinuation",
                    url=NO_EMPTY_CONTINUATION_URL,
                )
            )

        try:
            child = _node_from_line(line, directives, comments)
        except _LineError as err:
            raise fail(str(err), start, current) from None

        if "<<" in line and _can_contain_heredoc(child):
            try:
                heredocs = _heredocs_from_line(line)
            except _LineError as err:
                raise fail(str(err), start, current) from None
            for heredoc in heredocs:
                terminated = False
                while index < len(lines):
                    body_line = lines[index]
                    index += 1
                    current += 1
                    candidate = _trim_newline(body_line)
                    if heredoc.chomp:
                        candidate = candidate.lstrip("\t")
                    if candidate == heredoc.name:
                        terminated = True
                        break
                    heredoc.content += body_line
                if not terminated:
                    raise fail(
                        f"unterminated heredoc: no line {heredoc.name!r} ends the heredoc "
                        f"started on line {start}",
                        start,
                        current,
                    )
                child.heredocs.append(heredoc)

        child.start_line = start
        child.end_line = current
        children.append(child)
        comments = []

    if not children:
        raise fail("file with no instructions", max(current, 1))
    return ParseResult(
        children=children,
        escape_token=directives.escape,
        directives={name: d.value for name, d in directives.parser.seen.items()},
        warnings=warnings,
        filename=filename,
    )


def dump(result: ParseResult) -> str:
    """The AST as BuildKit's `Node.Dump()` prints it (one s-expression per instruction)."""
    return _go_trim_space("".join(f"({_dump_node(child)})\n" for child in result.children))


def chomp_heredoc_content(content: str) -> str:
    """A `<<-` heredoc body: leading tabs removed from every line."""
    return _LEADING_TABS_RE.sub("", content)


def parse_heredoc(word: str) -> Heredoc | None:
    """The heredoc a shell word such as `<<EOF`, `<<-"EOF"` or `3<<EOF` starts, or None.

    Raises ValueError when the delimiter has an unterminated quote (`<<'EOF`).
    """
    if "<<" not in word:
        return None
    match = _HEREDOC_RE.fullmatch(word)
    if match is None:
        return None
    fd_digits, chomp, rest = match.groups()
    if not rest:
        return None
    words = _split_shell_words(rest, raw_quotes=False, raw_escapes=False)
    if words is None:
        raise ValueError(f"unterminated quote in heredoc delimiter {rest!r}")
    if len(words) != 1:
        return None
    raw_words = _split_shell_words(rest, raw_quotes=True, raw_escapes=False)
    if raw_words is None or len(raw_words) != 1:
        raise ValueError(f"internal lexing of heredoc produced inconsistent results: {rest}")
    name, raw_name = words[0], raw_words[0]
    # Quotes that vanish when quotes are processed were quoting (part of) the delimiter,
    # and a quoted delimiter turns expansion off, as in a POSIX shell.
    expand = _count_quotes(name) == _count_quotes(raw_name)
    try:
        fd = int(fd_digits) if fd_digits else 0
    except ValueError:
        fd = 0
    return Heredoc(name=name, expand=expand, chomp=chomp == "-", file_descriptor=fd)


def split_command(line: str) -> tuple[str, list[str], str]:
    """Split a logical line into (instruction word, raw flags, argument text)."""
    parts = _WHITESPACE_RE.split(line.strip(GO_SPACE), maxsplit=1)
    if len(parts) == 1:
        return parts[0], [], ""
    rest = parts[1]
    if not rest.lstrip(GO_SPACE).startswith("--"):
        return parts[0], [], rest.strip(GO_SPACE)
    rest, flags = _extract_builder_flags(rest)
    return parts[0], flags, rest.strip(GO_SPACE)


# --- line assembly helpers -------------------------------------------------------------


class _LineError(Exception):
    """An argument parser rejected a line; parse() adds the location."""


def _split_lines(text: str) -> list[str]:
    # Each line keeps its "\n" because heredoc bodies are copied verbatim.
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _trim_newline(text: str) -> str:
    return text.rstrip("\r\n")


def _trim_left_space(text: str) -> str:
    return text.lstrip(GO_SPACE)


def _go_trim_space(text: str) -> str:
    return text.strip(GO_SPACE)


_trim_space = _go_trim_space


def _trim_continuation(line: str, directives: _Directives) -> tuple[str, bool]:
    """(line without its continuation token, whether the logical line ends here)."""
    if not line.rstrip(" \t").endswith(directives.escape):
        return line, True  # no escape token at the end: nothing to trim
    match = directives.continuation.search(line)
    if match is None:
        return line, True
    # The match runs to the end of the line: keep what precedes the escape token.
    return line[: match.start()] + (match.group(1) or ""), False


def _node_from_line(line: str, directives: _Directives, comments: list[str]) -> Node:
    command, flags, rest = split_command(line)
    value = command.lower()
    args, sub, is_json = _DISPATCH.get(value, _parse_ignore)(rest, directives)
    return Node(value, args, sub, flags, is_json, [], line, 0, 0, list(comments))


def _can_contain_heredoc(node: Node) -> bool:
    if node.value in _HEREDOC_WRAPPERS and node.sub is not None:
        node = node.sub
    return node.value in _HEREDOC_INSTRUCTIONS and not node.json


def _heredocs_from_line(line: str) -> list[Heredoc]:
    # A line that does not lex (an unterminated quote) simply has no heredocs, as in BuildKit.
    words = _split_shell_words(line, raw_quotes=True, raw_escapes=True) or []
    heredocs = []
    for word in words:
        try:
            heredoc = parse_heredoc(word)
        except ValueError as err:
            raise _LineError(str(err)) from None
        if heredoc is not None:
            heredocs.append(heredoc)
    return heredocs


def _count_quotes(word: str) -> int:
    return word.count("'") + word.count('"')


def _split_shell_words(text: str, *, raw_quotes: bool, raw_escapes: bool) -> list[str] | None:
    """Shell-style word splitting with `\\` as escape and variables left as written.

    A cut-down version of the shell lexer, enough to find heredoc delimiters: BuildKit runs
    its lexer here with an empty environment and unset variables kept, so `$x` stays as
    written. Returns None when a quote is not closed.
    """
    if "'" not in text and '"' not in text and "\\" not in text:
        return [word for word in _GO_SPACES_RE.split(text) if word]
    words: list[str] = []
    word = ""
    index = 0
    length = len(text)

    def finish() -> None:
        nonlocal word
        if word:
            words.append(word)
        word = ""

    while index < length:
        ch = text[index]
        if ch == "'":
            end = text.find("'", index + 1)
            if end < 0:
                return None
            body = text[index + 1 : end]
            word += f"'{body}'" if raw_quotes else body
            index = end + 1
        elif ch == '"':
            index += 1
            body = ""
            while True:
                if index >= length:
                    return None
                ch = text[index]
                if ch == '"':
                    index += 1
                    break
                if ch == "\\" and index + 1 < length and text[index + 1] in '"$\\':
                    if raw_escapes:
                        body += ch
                    index += 1
                    ch = text[index]
                body += ch
                index += 1
            word += f'"{body}"' if raw_quotes else body
        elif ch == "\\":
            if raw_escapes:
                word += ch
            index += 1
            if index < length:
                word += text[index]
                index += 1
        elif is_go_space(ch):
            finish()
            index += 1
        else:
            word += ch
            index += 1
    finish()
    return words


def _extract_builder_flags(line: str) -> tuple[str, list[str]]:
    """Take the leading `--flag` words off an argument string: (rest, flags).

    Flag words are quote- and backslash-aware (quotes are removed); a bare `--` ends the
    flags; the first word not starting with `--` starts the arguments.
    """
    if "'" not in line and '"' not in line and "\\" not in line:
        return _extract_plain_flags(line)
    words: list[str] = []
    word = ""
    quote = ""
    blank_ok = False
    in_spaces, in_word, in_quote = 0, 1, 2
    phase = in_spaces
    index = 0
    length = len(line)
    while True:
        at_end = index >= length
        ch = "" if at_end else line[index]
        if phase == in_spaces:
            if at_end:
                break
            if is_go_space(ch):
                index += 1
                continue
            if not line.startswith("--", index):
                return line[index:], words
            phase = in_word
        if at_end:
            if word != "--" and (blank_ok or word):
                words.append(word)
            break
        if phase == in_word:
            if is_go_space(ch):
                phase = in_spaces
                if word == "--":
                    return line[index:], words
                if blank_ok or word:
                    words.append(word)
                word = ""
                blank_ok = False
            elif ch in "'\"":
                quote = ch
                blank_ok = True
                phase = in_quote
            elif ch == "\\":
                if index + 1 < length:
                    index += 1
                    word += line[index]
            else:
                word += ch
        else:
            if ch == quote:
                phase = in_word
            elif ch == "\\":
                if index + 1 == length:
                    phase = in_word
                else:
                    index += 1
                    word += line[index]
            else:
                word += ch
        index += 1
    return "", words


_GO_SPACES_RE = re.compile(f"[{re.escape(GO_SPACE)}]+")
_NOT_SPACE_RE = re.compile(f"[^{re.escape(GO_SPACE)}]+")


def _extract_plain_flags(line: str) -> tuple[str, list[str]]:
    """`_extract_builder_flags` for a line without quotes or backslashes."""
    words: list[str] = []
    pos, length = 0, len(line)
    while True:
        space = _GO_SPACES_RE.match(line, pos)
        if space is not None:
            pos = space.end()
        if pos >= length:
            return "", words
        if not line.startswith("--", pos):
            return line[pos:], words
        word_match = _NOT_SPACE_RE.match(line, pos)
        assert word_match is not None  # line[pos] is "-"
        end = word_match.end()
        if line[pos:end] == "--":
            return line[end:], words
        words.append(line[pos:end])
        pos = end


# --- argument parsers (BuildKit's line_parsers.go dispatch table) -----------------------

_ParsedArgs = tuple[list[str], "Node | None", bool]


class _NotStringArray(Exception):
    pass


def _parse_ignore(rest: str, directives: _Directives) -> _ParsedArgs:
    # Unknown instruction words parse; the instructions layer rejects them. BuildKit's
    # node for them has one empty argument, which shows in the dump.
    return [""], None, False


def _parse_sub_command(rest: str, directives: _Directives) -> _ParsedArgs:
    if rest == "":
        return [], None, False
    return [], _node_from_line(rest, directives, []), False


def _parse_words(rest: str, escape: str) -> list[str]:
    """Split on white space outside quotes; quotes and escapes stay in the words."""
    if "'" not in rest and '"' not in rest and escape not in rest:
        # Nothing to be quote- or escape-aware about: plain splitting (the common case).
        return [word for word in _GO_SPACES_RE.split(rest) if word]
    plain_run, double_run = _WORD_RUNS[escape]
    words: list[str] = []
    parts: list[str] = []  # the current word, in pieces
    blank_ok = False  # a word that held quotes is kept even when empty
    index = 0
    length = len(rest)
    while True:
        # Between words: skip white space.
        space = _GO_SPACES_RE.match(rest, index)
        if space is not None:
            index = space.end()
        if index >= length:
            return words
        while index < length:
            run = plain_run.match(rest, index)
            if run is not None:
                parts.append(run.group())
                index = run.end()
                if index >= length:
                    break
            ch = rest[index]
            if ch == escape:
                # An unquoted escape keeps itself and the next character, even a quote.
                if index + 1 < length:
                    parts.append(rest[index : index + 2])
                index += 2  # a trailing escape is dropped
            elif ch == "'":
                blank_ok = True
                end = rest.find("'", index + 1)  # nothing is escaped in single quotes
                close = length if end < 0 else end + 1
                parts.append(rest[index:close])
                index = close
            elif ch == '"':
                blank_ok = True
                parts.append('"')
                index += 1
                while index < length:  # to the closing quote (or the end), escapes kept
                    run = double_run.match(rest, index)
                    if run is not None:
                        parts.append(run.group())
                        index = run.end()
                        if index >= length:
                            break
                    if rest[index] == '"':
                        parts.append('"')
                        index += 1
                        break
                    if index + 1 < length:
                        parts.append(rest[index : index + 2])
                    index += 2  # a trailing escape is dropped
            else:  # white space ends the word
                break
        word = "".join(parts)
        if blank_ok or word:
            words.append(word)
        parts = []
        blank_ok = False


def _word_runs(escape: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    e = re.escape(escape)
    return (
        re.compile(f"[^{re.escape(GO_SPACE)}'\"{e}]+"),  # unquoted: up to space/quote/escape
        re.compile(f'[^"{e}]+'),  # inside double quotes: up to the quote or an escape
    )


_WORD_RUNS = {"\\": _word_runs("\\"), "`": _word_runs("`")}


def _parse_name_val(rest: str, key: str, directives: _Directives) -> _ParsedArgs:
    words = _parse_words(rest, directives.escape)
    if not words:
        return [], None, False
    # The first word decides the form: `KEY name value` (legacy) or `KEY name=value ...`.
    if "=" not in words[0]:
        parts = _WHITESPACE_RE.split(rest, maxsplit=1)
        if len(parts) < 2:
            raise _LineError(f"{key} must have two arguments")
        return [parts[0], parts[1], ""], None, False
    args: list[str] = []
    for word in words:
        if "=" not in word:
            raise _LineError(
                f"Syntax error - can't find = in {go_quote(word)}. Must be of the form: name=value"
            )
        name, value = word.split("=", 1)
        args += [name, value, "="]
    return args, None, False


def _parse_env(rest: str, directives: _Directives) -> _ParsedArgs:
    return _parse_name_val(rest, "ENV", directives)


def _parse_label(rest: str, directives: _Directives) -> _ParsedArgs:
    return _parse_name_val(rest, "LABEL", directives)


def _parse_name_or_name_val(rest: str, directives: _Directives) -> _ParsedArgs:
    return _parse_words(rest, directives.escape), None, False


def _parse_strings_whitespace_delimited(rest: str, directives: _Directives) -> _ParsedArgs:
    if rest == "":
        return [], None, False
    return _WHITESPACE_RE.split(rest), None, False


def _parse_string(rest: str, directives: _Directives) -> _ParsedArgs:
    if rest == "":
        return [], None, False
    return [rest], None, False


def _parse_json(rest: str) -> list[str] | None:
    """The strings of a JSON array, None if `rest` is not a JSON array at all."""
    rest = _trim_left_space(rest)
    if not rest.startswith("["):
        return None
    try:
        value = _JSON.decode(rest)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, list):
        return None
    if not all(isinstance(item, str) for item in value):
        raise _NotStringArray
    if "\\u" not in rest and _SURROGATE_RE.search(rest) is None:
        return value
    # Go's decoder turns lone surrogates and invalid UTF-8 into U+FFFD.
    return [_SURROGATE_RE.sub("\ufffd", item) for item in value]


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str) -> object:
    # NaN and Infinity are not JSON to Go; the line then falls back to the shell form.
    raise ValueError(name)


_JSON = json.JSONDecoder(parse_constant=_reject_constant)


_NOT_STRING_ARRAY = "when using JSON array syntax, arrays must be comprised of strings only"


def _parse_maybe_json(rest: str, directives: _Directives) -> _ParsedArgs:
    if rest == "":
        return [], None, False
    try:
        items = _parse_json(rest)
    except _NotStringArray:
        raise _LineError(_NOT_STRING_ARRAY) from None
    if items is not None:
        return items, None, True
    return [rest], None, False


def _parse_maybe_json_to_list(rest: str, directives: _Directives) -> _ParsedArgs:
    try:
        items = _parse_json(rest)
    except _NotStringArray:
        raise _LineError(_NOT_STRING_ARRAY) from None
    if items is not None:
        return items, None, True
    return _parse_strings_whitespace_delimited(rest, directives)


def _parse_health_config(rest: str, directives: _Directives) -> _ParsedArgs:
    sep = 0
    while sep < len(rest) and not is_go_space(rest[sep]):
        sep += 1
    if sep == 0:
        return [], None, False
    following = sep
    while following < len(rest) and is_go_space(rest[following]):
        following += 1
    command, _, is_json = _parse_maybe_json(rest[following:], directives)
    return [rest[:sep], *command], None, is_json


_DISPATCH: dict[str, Callable[[str, _Directives], _ParsedArgs]] = {
    "add": _parse_maybe_json_to_list,
    "arg": _parse_name_or_name_val,
    "cmd": _parse_maybe_json,
    "copy": _parse_maybe_json_to_list,
    "entrypoint": _parse_maybe_json,
    "env": _parse_env,
    "expose": _parse_strings_whitespace_delimited,
    "from": _parse_strings_whitespace_delimited,
    "healthcheck": _parse_health_config,
    "label": _parse_label,
    "maintainer": _parse_string,
    "onbuild": _parse_sub_command,
    "run": _parse_maybe_json,
    "shell": _parse_maybe_json,
    "stopsignal": _parse_string,
    "user": _parse_string,
    "volume": _parse_maybe_json_to_list,
    "workdir": _parse_string,
}

INSTRUCTION_NAMES: tuple[str, ...] = tuple(sorted(_DISPATCH))


# --- dump ------------------------------------------------------------------------------


def _dump_node(node: Node) -> str:
    text = node.value
    if node.flags:
        text += " [" + " ".join(go_quote(flag) for flag in node.flags) + "]"
    for arg in node.args:
        text += " " + go_quote(arg)
    if node.sub is not None:
        text += " (" + _dump_node(node.sub) + ")"
    return _go_trim_space(text)
