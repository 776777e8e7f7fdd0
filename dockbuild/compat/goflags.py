"""Command lines as Go tools read them (pflag for kaniko, urfave/cli for buildctl).

``--name=value`` and ``--name value``; ``-f value``, ``-fvalue`` and ``-f=value`` for a
shorthand; a switch is ``--name`` or ``--name=BOOL`` (Go's strconv.ParseBool, never
``--name false``); a list flag may be given again and again. An unknown flag is an error
that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Go's strconv.ParseBool.
GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}

SWITCH, VALUE, LIST = "switch", "value", "list"


class FlagError(Exception):
    """A command line the front end cannot read (exit status 2)."""


@dataclass(frozen=True)
class Flag:
    name: str  # the long name, without dashes
    kind: str  # SWITCH, VALUE or LIST
    short: str = ""
    # Accepted and ignored: why the flag means nothing here (one line on stderr).
    ignored: str = ""
    # Refused: why dockbuild cannot do what the flag asks, and what to do instead.
    refused: str = ""
    alias_of: str = ""  # a deprecated spelling of another flag


@dataclass
class Parsed:
    values: dict[str, object] = field(default_factory=dict)  # by long name
    positional: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def get(self, name: str, default: object = None) -> object:
        return self.values.get(name, default)

    def text(self, name: str, default: str = "") -> str:
        value = self.values.get(name, default)
        return value if isinstance(value, str) else default

    def items(self, name: str) -> list[str]:
        value = self.values.get(name, [])
        return list(value) if isinstance(value, list) else []

    def switch(self, name: str) -> bool:
        return self.values.get(name) is True


def parse(flags: list[Flag], argv: list[str], *, interspersed: bool = True) -> Parsed:
    """Read ``argv`` against ``flags``; positional words are kept (after ``--`` all are).

    ``interspersed=False`` stops at the first positional word (urfave/cli's global flags
    before a subcommand): it and every word after it are positional.
    """
    by_long = {f.name: f for f in flags}
    by_short = {f.short: f for f in flags if f.short}
    out = Parsed()
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":
            out.positional += words[i:]
            break
        if not word.startswith("-") or word == "-":
            out.positional.append(word)
            if not interspersed:
                out.positional += words[i:]
                break
            continue
        if word.startswith("--"):
            name, sep, value = word[2:].partition("=")
            flag = by_long.get(name)
            shown = f"--{name}"
        else:
            name, value = word[1:2], word[2:]
            sep = ""
            if value.startswith("="):
                sep, value = "=", value[1:]
            elif value:
                sep = "attached"
            flag = by_short.get(name)
            shown = f"-{name}"
            if flag is not None and flag.kind == SWITCH and sep == "attached":
                raise FlagError(f"unknown shorthand flag: {name!r} in {word}")
        if flag is None:
            raise FlagError(f"unknown flag: {shown}")
        if flag.kind == SWITCH:
            if sep and value not in GO_BOOLS:
                raise FlagError(f'invalid argument "{value}" for "{shown}" flag: expected a boolean')
            result: object = GO_BOOLS[value] if sep else True
        else:
            if not sep:
                if i >= len(words):
                    raise FlagError(f"flag needs an argument: {shown}")
                value = words[i]
                i += 1
            result = value
        if flag.refused:
            raise FlagError(f"{shown} is not supported: {flag.refused}")
        target = by_long[flag.alias_of] if flag.alias_of else flag
        if flag.ignored:
            out.notes.append(f"note: ignoring {shown}: {flag.ignored}")
        if target.kind == LIST:
            previous = out.values.setdefault(target.name, [])
            assert isinstance(previous, list)
            previous.append(result)
        else:
            out.values[target.name] = result
    return out


def kv_list(text: str) -> list[tuple[str, str]]:
    """``a=1,"b=2,3",c`` as Go's csv reader splits BuildKit's attribute lists."""
    import csv

    fields = next(csv.reader([text]), [])
    pairs = []
    for item in fields:
        key, _, value = item.partition("=")
        pairs.append((key.strip(), value))
    return pairs
