"""argparse with the habits of docker's command line (the parser class of dockbuild/cli.py).

Loaded only when a command line needs argparse: a plain build command is read by the
CLI's fast path (cli._fast_build_args) without it.
"""

from __future__ import annotations

import argparse

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any, NoReturn


# docker build / buildx build flags that dockbuild does not have: each is refused by name
# (exit status 2), not taken for a misspelling.
_UNSUPPORTED = frozenset({
    "--annotation", "--attest", "--builder", "--cgroup-parent", "--cpu-period", "--cpu-quota",
    "--cpu-shares", "--cpuset-cpus", "--cpuset-mems", "--detach", "--isolation", "--memory",
    "--memory-swap", "--provenance", "--sbom", "--security-opt", "--ulimit",
})  # fmt: skip

# Flags that mean nothing here, accepted (with any value) so that docker build command
# lines work unchanged; --debug says why each is ignored.
_IGNORED = {
    "--rm": "there is no intermediate container",
    "--force-rm": "there is no intermediate container",
    "--compress": "the context is read in place, never sent to a daemon",
    "--disable-content-trust": "dockbuild verifies no image signatures",
}

# Go's boolean flag values (strconv.ParseBool): docker users write `--pull=false`.
_GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}

# `--call` (buildx): the default and `check` are dockbuild's build and --check.
_CALLS = {"build": None, "check": "--check"}


class Parser(argparse.ArgumentParser):
    """argparse with the habits users and scripts know from docker's command line.

    An option that takes a value takes the next word, whatever it looks like (`-o -`,
    `--tag -x`; argparse alone would take `-x` for an option); no prefix of an option
    stands for it (`allow_abbrev=False`); a switch takes Go's `--pull=false` form; a
    usage error is a usage line, `ERROR: ...` and exit status 2. With ``docker_flags``
    (the build command), docker's flags that dockbuild lacks are refused by name and the
    harmless ones are ignored, with a note kept in ``notes`` for --debug.
    """

    def __init__(self, *, docker_flags: bool = False, **kwargs: Any) -> None:
        self._value_options: dict[str, str] = {}  # option string -> its long name
        self._switches: set[str] = set()  # options that take no value (store_true)
        self._docker_flags = docker_flags
        self.notes: list[str] = []
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(**kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and action.nargs is None:  # takes exactly one value
            names = action.option_strings
            long = next((s for s in names if s.startswith("--")), names[0])
            self._value_options.update(dict.fromkeys(action.option_strings, long))
        elif isinstance(action, argparse._StoreTrueAction):
            self._switches.update(action.option_strings)
        return action

    def parse_known_args(  # type: ignore[override]  # one signature for argparse's overloads
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        return super().parse_known_args(None if args is None else self._join_values(args), namespace)

    def _join_values(self, args: Sequence[str]) -> list[str]:
        """`-o VALUE` -> `--output=VALUE`: the value can no longer pass for an option.

        `--switch=BOOL` becomes `--switch` or nothing, and docker's flags are dealt with.
        """
        out: list[str] = []
        words = iter(args)
        for word in words:
            if word == "--":
                out += [word, *words]
                break
            long = self._value_options.get(word)
            if long:
                value = next(words, None)
                out.append(word if value is None else f"{long}={value}")
                continue
            name, sep, value = word.partition("=")
            if sep and name in self._switches:
                if value not in _GO_BOOLS:
                    self.error(f"invalid boolean value {value!r} for {name}")
                out += [name] if _GO_BOOLS[value] else []
            elif self._docker_flags and name.startswith("--"):
                out += self._docker_flag(word, name, value if sep else None, words)
            else:
                out.append(word)
        return out

    def _docker_flag(self, word: str, name: str, value: str | None, words: Iterator[str]) -> list[str]:
        """What a docker build flag dockbuild lacks becomes: nothing, --check, or an error."""
        if name in _UNSUPPORTED:
            self.error(f"dockbuild does not support `{name}` yet")
        if name in _IGNORED:
            if value is not None and value not in _GO_BOOLS:
                self.error(f"invalid boolean value {value!r} for {name}")
            self.notes.append(f"note: dockbuild ignores `{name}`: {_IGNORED[name]}")
            return []
        if name == "--call":
            value = next(words, None) if value is None else value
            if value is None:
                self.error("argument --call: expected one argument")
            if value not in _CALLS:
                self.error(f"dockbuild does not support `--call={value}` yet")
            check = _CALLS[value]
            return [check] if check else []
        return [word]

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.format_usage()}ERROR: {message}\nhint: see '{self.prog} --help'\n")
