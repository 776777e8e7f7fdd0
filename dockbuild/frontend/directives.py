"""Parser directives (`# syntax=`, `# escape=`, `# check=`) at the top of a Dockerfile.

The rules follow BuildKit's `parser/directives.go`: a directive is a comment of the form
`# key = value` (keys case-insensitive, values case-sensitive); the directive block ends at
the first line that is not a known directive (an instruction, an empty line, any other
comment); a repeated directive is an error; `escape` accepts only a backtick or a backslash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from dockbuild.errors import DockerfileError, Location

UTF8_BOM = "\ufeff"
DEFAULT_ESCAPE = "\\"
KNOWN_DIRECTIVES = ("syntax", "escape", "check")

# Go's regexp `\s` is ASCII-only ([\t\n\f\r ]); Python's would also match \v and Unicode
# spaces, so the class is spelled out.
_GO_S = "[\t\n\f\r ]"
_DIRECTIVE_RE = re.compile(rf"^([a-zA-Z][a-zA-Z0-9]*){_GO_S}*={_GO_S}*(.+?){_GO_S}*\Z")


def strip_bom(text: str) -> str:
    """Drop a UTF-8 byte-order mark at the start of the file."""
    return text[1:] if text.startswith(UTF8_BOM) else text


@dataclass(frozen=True)
class Directive:
    """One parser directive: `name` is lower-cased, `value` is verbatim; `line` is 1-based."""

    name: str
    value: str
    line: int


@dataclass
class DirectiveParser:
    """Feeds lines one at a time, as the Dockerfile parser reads them.

    `comment_prefix` is `#` for Dockerfiles; syntax detection also tries `//`.
    """

    filename: str = "Dockerfile"
    comment_prefix: str = "#"
    line: int = 0
    done: bool = False
    seen: dict[str, Directive] = field(default_factory=dict)

    def parse_line(self, line: str) -> Directive | None:
        """The directive on `line` (already stripped of its newline), or None.

        Raises DockerfileError for a repeated directive.
        """
        self.line += 1
        if self.done:
            return None
        if not line.startswith(self.comment_prefix):
            self.done = True
            return None
        body = _trim_left_space(line[len(self.comment_prefix) :])
        match = _DIRECTIVE_RE.match(body)
        if match is None:
            self.done = True
            return None
        name = match.group(1).lower()
        if name not in KNOWN_DIRECTIVES:
            self.done = True
            return None
        if name in self.seen:
            raise DockerfileError(
                f"only one {name} parser directive can be used",
                location=Location(self.filename, self.line, self.line),
            )
        directive = Directive(name, match.group(2), self.line)
        self.seen[name] = directive
        return directive


def validate_escape(value: str, *, filename: str = "Dockerfile", line: int = 0) -> str:
    """The escape token named by an `escape` directive; only ` and \\ are allowed."""
    if value not in ("`", "\\"):
        raise DockerfileError(
            f"invalid escape token '{value}' does not match ` or \\",
            location=Location(filename, line, line),
        )
    return value


def parse_directives(text: str, filename: str = "Dockerfile") -> dict[str, str]:
    """All directives at the top of `text`, by lower-cased name."""
    parser = DirectiveParser(filename=filename)
    for raw in strip_bom(text).split("\n"):
        if parser.done:
            break
        directive = parser.parse_line(raw.rstrip("\r"))
        if directive is not None and directive.name == "escape":
            validate_escape(directive.value, filename=filename, line=directive.line)
    return {name: d.value for name, d in parser.seen.items()}


def detect_syntax(text: str) -> str | None:
    """The frontend image named by `syntax`, as BuildKit's DetectSyntax finds it.

    Besides `# syntax=`, a leading `#!` shebang line is skipped and `// syntax=` and a
    JSON document `{"syntax": "..."}` are accepted. Only the first word of the value counts
    (the rest is frontend arguments).
    """
    text = strip_bom(text)
    first, _, rest = text.partition("\n")
    if first.startswith("#!"):
        text = rest
    for prefix in ("#", "//"):
        parser = DirectiveParser(comment_prefix=prefix)
        try:
            for raw in text.split("\n"):
                if parser.done:
                    break
                parser.parse_line(raw.rstrip("\r"))
        except DockerfileError:
            pass
        if "syntax" in parser.seen:
            return parser.seen["syntax"].value.split(" ", 1)[0]
    try:
        document = json.loads(text)
    except ValueError:
        return None
    syntax = document.get("syntax") if isinstance(document, dict) else None
    return syntax if isinstance(syntax, str) else None


@dataclass(frozen=True)
class CheckConfig:
    """The `# check=` directive: lint rules to skip, and whether violations fail the build."""

    skip: tuple[str, ...] = ()
    skip_all: bool = False
    error: bool = False
    experimental: tuple[str, ...] = ()
    experimental_all: bool = False


def parse_check(value: str, *, filename: str = "Dockerfile", line: int = 0) -> CheckConfig:
    """Parse a `check` value such as `skip=JSONArgsRecommended,StageNameCasing;error=true`."""
    value = value.strip()
    if not value:
        return CheckConfig()
    skip: tuple[str, ...] = ()
    experimental: tuple[str, ...] = ()
    skip_all = experimental_all = error = False
    location = Location(filename, line, line)
    for part in value.split(";"):
        key, sep, val = part.partition("=")
        if not sep:
            raise DockerfileError(f"invalid check option {part!r}", location=location)
        key, val = key.strip(), val.strip()
        if key in ("skip", "experimental"):
            rules = tuple(rule.strip() for rule in val.split(","))
            everything = val == "all"
            if key == "skip":
                skip, skip_all = (() if everything else rules), everything
            else:
                experimental, experimental_all = (() if everything else rules), everything
        elif key == "error":
            parsed = _parse_go_bool(val)
            if parsed is None:
                raise DockerfileError(
                    f"failed to parse check option {part!r}: {val!r} is not a boolean",
                    location=location,
                )
            error = parsed
        else:
            raise DockerfileError(
                f"invalid check option {key!r} (expected skip, error or experimental)",
                location=location,
            )
    return CheckConfig(skip, skip_all, error, experimental, experimental_all)


def _parse_go_bool(value: str) -> bool | None:
    # strconv.ParseBool's spellings, so `error=1` or `error=True` behave as in BuildKit.
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    return None


# Go's unicode.IsSpace: unlike str.isspace it excludes \x1c-\x1f (and U+180E).
GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_GO_SPACE_SET = frozenset(GO_SPACE)


def _trim_left_space(text: str) -> str:
    return text.lstrip(GO_SPACE)


def is_go_space(ch: str) -> bool:
    """Go's unicode.IsSpace: the white space BuildKit trims and splits on."""
    return ch in _GO_SPACE_SET
