"""Dockerfile word expansion: quotes, escapes and ``$VAR`` substitution as BuildKit's lexer does it.

This is the behaviour of BuildKit's ``frontend/dockerfile/shell/lex.go``, pinned by its own
test tables (``envVarTest``, ``wordsTest``). It is deliberately *not* a POSIX shell: no
command substitution, no arithmetic, no field splitting except for ``process_words``, and a
handful of BuildKit quirks that Dockerfiles in the wild depend on are kept on purpose.

Where we knowingly differ from BuildKit's lexer:
- ``${name`` ending the word reports "syntax error: missing '}'" (BuildKit: "unsupported
  modifier (\ufffd)");
- ``process_words`` keeps the text before a ``${v:-...}`` in the same word (BuildKit's
  shared word buffer drops it).
As in BuildKit, glob patterns have no bracket expressions: ``[`` is an ordinary character.

Expansion applies to the arguments of ADD, COPY, ENV, EXPOSE, FROM, LABEL, STOPSIGNAL, USER,
VOLUME, WORKDIR, ONBUILD and to several flag values; RUN/CMD/ENTRYPOINT bodies are left to
the container's shell.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Protocol

from dockbuild.frontend.goformat import go_quote

__all__ = ["Env", "EnvGetter", "Lex", "ShellError", "env_from_list"]


class ShellError(ValueError):
    """A word could not be expanded (bad substitution, unterminated quote, ``${v:?msg}``...).

    ``reason`` is BuildKit's message for the failure (``v: msg``, ``syntax error: bad
    substitution``); ``str(error)`` adds the word, as BuildKit does:
    ``failed to process "${v:?msg}": v: msg``.
    """

    def __init__(self, word: str, reason: str) -> None:
        super().__init__(f"failed to process {go_quote(word)}: {reason}")
        self.word = word
        self.reason = reason


class EnvGetter(Protocol):
    """Anything that answers a variable's value, or None when it is unset.

    A ``Mapping[str, str]`` already is one; build-stage scopes can be, too.
    """

    def get(self, name: str, /) -> str | None: ...


Env = Mapping[str, str] | EnvGetter | list[str] | tuple[str, ...]


def env_from_list(entries: Iterable[str]) -> dict[str, str]:
    """``["K=V", ...]`` as a mapping, the way BuildKit reads env slices.

    A later entry wins over an earlier one; an entry without ``=`` names a variable that is
    set but empty. Names stay case-sensitive (Linux semantics).
    """
    env: dict[str, str] = {}
    for entry in entries:
        name, _, value = entry.partition("=")
        env[name] = value
    return env


class Lex:
    """Expands Dockerfile words with a given escape token (``\\`` or a backtick).

    The flags have BuildKit's meaning:

    - ``raw_quotes``: keep the quote characters in the result.
    - ``raw_escapes``: keep the escape tokens in the result.
    - ``skip_unset_env``: leave references to unset variables as they were written
      (``$X``, ``${X}``, ``${X:-y}``) instead of expanding them.
    - ``skip_process_quotes``: treat quotes as ordinary characters (heredoc bodies).

    A ``Lex`` holds no per-call state, so one instance may be shared between threads.
    """

    def __init__(self, escape_token: str = "\\") -> None:
        if len(escape_token) != 1:
            raise ValueError(f"escape token must be one character, not {escape_token!r}")
        self.escape_token = escape_token
        self.raw_quotes = False
        self.raw_escapes = False
        self.skip_unset_env = False
        self.skip_process_quotes = False
        # What makes a word need the scanner: `$`, the escape token, quotes, a BOM.
        self._special = re.compile(f"[$'\"{re.escape(escape_token)}{_BOM}]")

    def process_word(self, word: str, env: Env) -> str:
        """``word`` with its quotes removed and its variables expanded, as one string."""
        return self.process_word_with_matches(word, env)[0]

    def process_words(self, word: str, env: Env) -> list[str]:
        """``word`` expanded, then split on unquoted, unescaped white space (EXPOSE, VOLUME...).

        White space that comes out of a variable splits too; quoted white space does not.
        """
        if self.is_plain(word):
            return _split_plain(word)
        expansion = _Expansion(self, word, _as_getter(env))
        words = _Words()
        expansion.run(words)
        return words.finish()

    def process_word_with_matches(self, word: str, env: Env) -> tuple[str, set[str], set[str]]:
        """Like ``process_word``, plus the names that were set and those that were not.

        The unset names feed the ``UndefinedVar`` and ``UndefinedArgInFrom`` checks.
        """
        if self.is_plain(word):
            return word, set(), set()
        expansion = _Expansion(self, word, _as_getter(env))
        result = expansion.run(None)
        return result, expansion.matched, expansion.unmatched

    def is_plain(self, word: str) -> bool:
        """Whether `word` holds nothing to expand (most paths, image names, ports)."""
        if self.skip_process_quotes:
            return "$" not in word and self.escape_token not in word and _BOM not in word
        return self._special.search(word) is None


# --- implementation -------------------------------------------------------------------

_BOM = "\ufeff"
_ASCII_NAME = re.compile("[A-Za-z0-9_]+")

# Go's unicode.IsSpace, which is narrower than str.isspace (that one also counts
# U+001C..U+001F as space).
_SPACES = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)

# Shell special parameters: one character each; they are never set in a Dockerfile but
# must be consumed as names so that `$@x` gives `x`.
_SPECIAL_PARAMS = frozenset("@*#?-$!0")

_MISSING_BRACE = "syntax error: missing '}'"


class _Failure(Exception):
    """Raised inside the scanner; Lex turns it into a ShellError naming the whole word."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Words:
    """Collects words the way BuildKit's ``wordsStruct`` does.

    Characters from plain text and from variables split on white space; quoted text and
    escaped characters never do, and an empty quoted string alone does not make a word.
    """

    __slots__ = ("buf", "words", "in_word")

    def __init__(self) -> None:
        self.buf: list[str] = []
        self.words: list[str] = []
        self.in_word = False

    def add_string(self, text: str) -> None:
        for ch in text:
            if ch not in _SPACES:
                self.buf.append(ch)
                self.in_word = True
            elif self.in_word and self.buf:
                self.words.append("".join(self.buf))
                self.buf.clear()
                self.in_word = False

    def add_raw_string(self, text: str) -> None:
        if text:
            self.buf.append(text)
        self.in_word = True

    def finish(self) -> list[str]:
        if self.buf:
            self.words.append("".join(self.buf))
            self.buf.clear()
            self.in_word = False
        return self.words


def _split_plain(word: str) -> list[str]:
    words = _Words()
    words.add_string(word)
    return words.finish()


def _as_getter(env: Env) -> EnvGetter:
    if isinstance(env, str):
        raise TypeError("env must be a mapping or a list of 'K=V' strings, not a string")
    if isinstance(env, list | tuple):
        return env_from_list(env)
    return env


@functools.lru_cache(maxsize=64)
def _plain_run(escape: str, stop: str, quotes: bool) -> re.Pattern[str]:
    """A regex matching a run of characters with no meaning in the current context.

    Copying such runs in one slice keeps the scanner from looping in Python over every
    character of long, mostly literal words.
    """
    special = "$" + escape + stop + ("'\"" if quotes else "")
    return re.compile("[^" + "".join(re.escape(c) for c in special) + "]+")


class _Expansion:
    """The state of one expansion: the source, a cursor, and the names looked up."""

    def __init__(self, lex: Lex, word: str, env: EnvGetter) -> None:
        self.word = word
        # Go's text/scanner drops a byte-order mark at the very start of its input.
        self.src = word[1:] if word.startswith(_BOM) else word
        self.pos = 0
        self.end = len(self.src)
        self.env = env
        self.escape = lex.escape_token
        self.raw_quotes = lex.raw_quotes
        self.raw_escapes = lex.raw_escapes
        self.skip_unset_env = lex.skip_unset_env
        self.quotes = not lex.skip_process_quotes
        self.matched: set[str] = set()
        self.unmatched: set[str] = set()

    def run(self, words: _Words | None) -> str:
        try:
            return self.stop_on("", self.raw_escapes, words)
        except _Failure as failure:
            raise ShellError(self.word, failure.reason) from None

    # -- scanning ----------------------------------------------------------------------

    def stop_on(self, stop: str, raw_escapes: bool, words: _Words | None = None) -> str:
        """Process up to the unescaped, unquoted ``stop`` character (or the end if "")."""
        saved = self.raw_escapes
        # Patterns of ${v#...}, ${v%...} and ${v/.../...} keep their escapes so that the
        # pattern compiler can tell `\*` (a star) from `*` (a wildcard).
        self.raw_escapes = raw_escapes
        try:
            return self._stop_on(stop, words)
        finally:
            self.raw_escapes = saved

    def _stop_on(self, stop: str, words: _Words | None) -> str:
        src, end, escape = self.src, self.end, self.escape
        plain = _plain_run(escape, stop, self.quotes)
        out: list[str] = []
        while self.pos < end:
            ch = src[self.pos]
            if stop and ch == stop:
                self.pos += 1
                return "".join(out)
            if ch == "$":
                value = self.dollar()
                out.append(value)
                if words is not None:
                    words.add_string(value)
            elif self.quotes and ch == "'":
                value = self.single_quote()
                out.append(value)
                if words is not None:
                    words.add_raw_string(value)
            elif self.quotes and ch == '"':
                value = self.double_quote()
                out.append(value)
                if words is not None:
                    words.add_raw_string(value)
            elif ch == escape:
                self.pos += 1
                if self.raw_escapes:
                    out.append(ch)
                    if words is not None:
                        words.add_raw_string(ch)
                if self.pos >= end:
                    # A trailing escape token escapes nothing and is dropped.
                    break
                ch = src[self.pos]
                self.pos += 1
                out.append(ch)
                if words is not None:
                    words.add_raw_string(ch)
            else:
                match = plain.match(src, self.pos)
                assert match is not None  # ch itself is not special
                run = match.group()
                self.pos = match.end()
                out.append(run)
                if words is not None:
                    words.add_string(run)
        if stop:
            raise _Failure(f"unexpected end of statement while looking for matching {stop}")
        return "".join(out)

    def single_quote(self) -> str:
        # Everything up to the next ' is literal; a ' cannot be escaped inside.
        start = self.pos + 1
        close = self.src.find("'", start)
        if close < 0:
            self.pos = self.end
            raise _Failure("unexpected end of statement while looking for matching single-quote")
        self.pos = close + 1
        body = self.src[start:close]
        return f"'{body}'" if self.raw_quotes else body

    def double_quote(self) -> str:
        # `$` expands; the escape token escapes only `"`, `$` and itself, and stays
        # literal before anything else (so "a\tb" keeps its backslash).
        src, end, escape = self.src, self.end, self.escape
        out: list[str] = ['"'] if self.raw_quotes else []
        self.pos += 1
        while True:
            if self.pos >= end:
                raise _Failure(
                    "unexpected end of statement while looking for matching double-quote"
                )
            ch = src[self.pos]
            if ch == '"':
                self.pos += 1
                if self.raw_quotes:
                    out.append(ch)
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            self.pos += 1
            if ch == escape:
                if self.raw_escapes:
                    out.append(ch)
                if self.pos < end and src[self.pos] in ('"', "$", escape):
                    ch = src[self.pos]
                    self.pos += 1
                # BuildKit writes the escape a second time here when raw_escapes is set
                # and the next character is not escapable; kept for identical patterns.
            out.append(ch)

    def name(self) -> str:
        """Read a variable name: digits only, one special character, or [letters digits _]."""
        src, end = self.src, self.end
        start = self.pos
        if start >= end:
            return ""
        first = src[start]
        if first.isdecimal():
            # Positional parameters: `$1x` is `$1` followed by `x`.
            pos = start + 1
            while pos < end and src[pos].isdecimal():
                pos += 1
            self.pos = pos
            return src[start:pos]
        if first in _SPECIAL_PARAMS:
            self.pos = start + 1
            return first
        ascii_run = _ASCII_NAME.match(src, start, end)  # the common case, in one step
        pos = start if ascii_run is None else ascii_run.end()
        while pos < end and (src[pos].isalpha() or src[pos].isdecimal() or src[pos] == "_"):
            pos += 1
        self.pos = pos
        return src[start:pos]

    def lookup(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None:
            self.unmatched.add(name)
        else:
            self.matched.add(name)
        return value

    def next_char(self) -> str:
        if self.pos >= self.end:
            return ""
        ch = self.src[self.pos]
        self.pos += 1
        return ch

    # -- substitutions -----------------------------------------------------------------

    def dollar(self) -> str:
        src, end = self.src, self.end
        self.pos += 1  # the $
        if self.pos >= end or src[self.pos] != "{":
            name = self.name()
            if not name:
                return "$"  # a lone $ is literal
            value = self.lookup(name)
            if value is None:
                return "$" + name if self.skip_unset_env else ""
            return value

        self.pos += 1  # the {
        if self.pos >= end:
            raise _Failure(_MISSING_BRACE)
        if src[self.pos] in "{}:":
            raise _Failure("syntax error: bad substitution")
        name = self.name()
        ch = self.next_char()

        if ch == "}":
            value = self.lookup(name)
            if value is None:
                return "${" + name + "}" if self.skip_unset_env else ""
            return value
        if ch == "":
            # BuildKit reports "unsupported modifier (\ufffd)" here; the missing brace
            # is what the user needs to hear.
            raise _Failure(_MISSING_BRACE)
        if ch == "/":
            return self._replace(name)
        if ch not in ":+-?#%":
            raise _Failure(f"unsupported modifier ({ch}) in substitution")

        modifier, written = ch, ch
        null_is_unset = ch == ":"
        if null_is_unset:
            # Whatever follows the colon is taken as the modifier; the unknown ones
            # (`:=`, `:x`) are rejected only after their word has been read.
            modifier = self.next_char()
            written = ":" + modifier
            if modifier in ("#", "%"):
                raise _Failure(f"unsupported modifier ({written}) in substitution")

        word = self._read_until_brace(raw_escapes=modifier in ("#", "%"))
        value = self.lookup(name)
        if value is None and self.skip_unset_env:
            return "${" + name + written + word + "}"

        empty = value is None or (null_is_unset and value == "")
        if modifier == "-":
            return word if empty else value or ""
        if modifier == "+":
            return "" if empty else word
        if modifier == "?":
            if value is None:
                raise _Failure(f"{name}: {word or 'is not allowed to be unset'}")
            if null_is_unset and value == "":
                raise _Failure(f"{name}: {word or 'is not allowed to be empty'}")
            return value
        if modifier in ("#", "%"):
            # `##`/`%%` arrive as a pattern starting with the modifier again; BuildKit
            # checks after expansion, so `${v#$X}` with X="#a" is a longest match of "a".
            greedy = word.startswith(modifier)
            if greedy:
                word = word[1:]
            if modifier == "%":
                return _trim_suffix(word, value or "", greedy)
            return _trim_prefix(word, value or "", greedy)
        raise _Failure(f"unsupported modifier ({written}) in substitution")

    def _read_until_brace(self, raw_escapes: bool) -> str:
        try:
            return self.stop_on("}", raw_escapes)
        except _Failure:
            # An error that ran into the end of the word is, to the user, a missing brace.
            if self.pos >= self.end:
                raise _Failure(_MISSING_BRACE) from None
            raise

    def _replace(self, name: str) -> str:
        replace_all = self.pos < self.end and self.src[self.pos] == "/"
        if replace_all:
            self.pos += 1
        try:
            pattern = self.stop_on("/", True)
        except _Failure:
            if self.pos >= self.end:
                raise _Failure("syntax error: missing '/' in ${}") from None
            raise
        replacement = self._read_until_brace(raw_escapes=True)

        value = self.lookup(name)
        if value is None:
            if self.skip_unset_env:
                return "${" + name + "/" + pattern + "/" + replacement + "}"
            value = ""
        regex = _compile(pattern, greedy=True)
        if replace_all:
            return _replace_all(regex, value, replacement)
        match = regex.search(value)
        if match is None:
            return value
        return value[: match.start()] + replacement + value[match.end() :]


# --- patterns ---------------------------------------------------------------------------


def _compile(pattern: str, *, greedy: bool) -> re.Pattern[str]:
    try:
        return _compile_cached(pattern, greedy)
    except _PatternError as error:
        raise _Failure(f"invalid pattern ({pattern}) in substitution: {error}") from None


class _PatternError(Exception):
    pass


@functools.lru_cache(maxsize=256)
def _compile_cached(pattern: str, greedy: bool) -> re.Pattern[str]:
    """A shell pattern (`*`, `?`, backslash escapes) as a regex, the way BuildKit builds it.

    Like BuildKit there are no bracket expressions: `[` is literal. The pattern escape is
    always a backslash, whatever the Dockerfile escape token; `\\}` and `\\/` stand for
    the bare character (they had to be escaped to get through `${...}`).
    """
    star = ".*" if greedy else ".*?"
    parts: list[str] = []
    i, end = 0, len(pattern)
    while i < end:
        ch = pattern[i]
        i += 1
        if ch == "*":
            parts.append(star)
        elif ch == "?":
            parts.append(".")
        elif ch == "\\":
            following = pattern[i] if i < end else ""
            if following in ("}", "/"):
                continue
            if following not in ("*", "?", "\\"):
                shown = following or "<end of pattern>"
                raise _PatternError(f"invalid escape '\\{shown}'")
            parts.append("\\" + following)
            i += 1
        else:
            parts.append(re.escape(ch))
    # Unanchored: trimming anchors with re.match, replacing searches with re.search.
    return re.compile("".join(parts))


def _trim_prefix(pattern: str, value: str, greedy: bool) -> str:
    match = _compile(pattern, greedy=greedy).match(value)
    return value[match.end() :] if match else value


def _trim_suffix(pattern: str, value: str, greedy: bool) -> str:
    # A regex cannot ask for the shortest match that ends at the end, so (like BuildKit)
    # reverse both the value and the pattern and trim a prefix instead.
    trimmed = _trim_prefix(_reverse_pattern(pattern), value[::-1], greedy)
    return trimmed[::-1]


def _reverse_pattern(pattern: str) -> str:
    """Reverse a pattern, keeping each `\\x` escape pair in order (`a\\*c` -> `c\\*a`)."""
    pieces: list[str] = []
    i, last = 0, len(pattern) - 1
    while i <= last:
        if pattern[i] == "\\" and i != last:
            pieces.append(pattern[i : i + 2])
            i += 2
        else:
            pieces.append(pattern[i])
            i += 1
    return "".join(reversed(pieces))


def _replace_all(regex: re.Pattern[str], value: str, template: str) -> str:
    """Go's ``Regexp.ReplaceAllString``, which BuildKit uses for ``${v//pat/rep}``.

    It differs from ``re.sub`` in two visible ways: an empty match right after a match is
    not replaced (``${v//*/x}`` gives one ``x``, not two), and ``$0``/``${0}``/``$$`` in
    the replacement are template references.
    """
    out: list[str] = []
    last_end = 0
    search = 0
    size = len(value)
    while search <= size:
        match = regex.search(value, search)
        if match is None:
            break
        start, stop = match.span()
        out.append(value[last_end:start])
        if stop > last_end or start == 0:
            out.append(_expand_template(template, match.group()))
        last_end = stop
        # Always advance at least one character so empty matches cannot loop.
        search = max(search + 1, stop)
    out.append(value[last_end:])
    return "".join(out)


def _expand_template(template: str, matched: str) -> str:
    """Go's ``Regexp.Expand`` for a pattern without groups: only ``$0`` means something.

    ``$$`` is a dollar; ``$name`` / ``${name}`` (any other name or number) is empty; a
    ``$`` that starts no reference stays literal.
    """
    if "$" not in template:
        return template
    out: list[str] = []
    i, end = 0, len(template)
    while True:
        dollar = template.find("$", i)
        if dollar < 0:
            out.append(template[i:])
            return "".join(out)
        out.append(template[i:dollar])
        i = dollar + 1
        if i < end and template[i] == "$":
            out.append("$")
            i += 1
            continue
        brace = i < end and template[i] == "{"
        start = i + 1 if brace else i
        stop = start
        while stop < end and (
            template[stop].isalpha() or template[stop].isdecimal() or template[stop] == "_"
        ):
            stop += 1
        name = template[start:stop]
        if not name or (brace and (stop >= end or template[stop] != "}")):
            out.append("$")
            continue
        i = stop + 1 if brace else stop
        if name == "0":
            out.append(matched)
