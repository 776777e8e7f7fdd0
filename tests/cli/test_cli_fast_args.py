"""The build command's fast path reads a command line exactly as argparse does, or not at all."""

from __future__ import annotations

import pytest

from dockbuild import cli

PARSER_KEYS = {"run", "parser", "command", "debug_command", "history_command"}

READ_FAST = [
    ["build", "."],
    ["build", "--progress=quiet", "--build-context", "busybox=oci-layout:///x/y", "ctx"],
    ["build", "-f", "sub/Dockerfile.dev", "-t", "a:1", "--tag=b", "-o", "type=oci,dest=o.tar", "."],
    ["build", ".", "--build-arg", "A=1", "--build-arg=B", "--label", "l=v", "--label=k", "--target", "t"],
    ["build", "-q", "--no-cache", "--pull", "--push", "--load", "--squash", "--debug", "--explain-cache", "."],
    ["build", "--check", "."],
    ["build", "-t", "-x", "."],  # a value option takes the next word, whatever it looks like
    ["build", "-o", "-", "."],
    ["build", "--iidfile", "id", "--metadata-file=m.json", "--platform", "linux/amd64", "."],
    ["build", "--secret", "id=s,src=f", "--ssh", "default", "--allow", "network.host,x", "."],
    ["build", "--cache-from", "type=local,src=c", "--cache-to=type=inline", "--no-cache-filter", "a,b", "."],
    ["build", "--executor", "chroot", "--network=none", "."],
    ["build", "-"],
    ["build", "--progress", "plain", "--progress", "tty", "."],  # the last one wins
]

LEFT_TO_ARGPARSE = [
    ["build"],  # no PATH
    ["build", "a", "b"],  # two
    ["build", "--help", "."],
    ["build", "-h"],
    ["build", "--pull=false", "."],  # Go's boolean form
    ["build", "--rm", "."],  # a docker flag dockbuild ignores
    ["build", "--memory", "1g", "."],  # one it refuses
    ["build", "--call", "check", "."],
    ["build", "-qt", "x", "."],  # a short flag cluster
    ["build", "-o=x", "."],
    ["build", "--tag", "."],  # PATH taken as the tag: no PATH left
    ["build", "--build-arg", "=1", "."],  # a bad value: argparse says what is wrong
    ["build", "--build-context", "x", "."],
    ["build", "--network", "bridge", "."],
    ["build", "--add-host", "h:1.2.3.4", "."],  # flags with a typed value argparse checks
    ["build", "--shm-size", "64m", "."],
    ["build", "--progres=quiet", "."],  # no abbreviations
    ["build", "--", "."],
    ["build", ".", "-t"],  # a value missing
    ["du"],
    ["debug", "llb", "."],
]


@pytest.mark.parametrize("argv", READ_FAST, ids=" ".join)
def test_fast_path_gives_build_the_arguments_argparse_gives(argv: list[str]) -> None:
    fast = cli._fast_build_args(argv)
    assert fast is not None
    ns, extra = cli._parser().parse_known_args(argv)
    assert extra == []
    assert fast == {k: v for k, v in vars(ns).items() if k not in PARSER_KEYS}


@pytest.mark.parametrize("argv", LEFT_TO_ARGPARSE, ids=" ".join)
def test_fast_path_leaves_other_command_lines_to_argparse(argv: list[str]) -> None:
    assert cli._fast_build_args(argv) is None


def test_every_build_flag_is_known_to_the_fast_path_or_leaves_it_to_argparse() -> None:
    """A flag added to the build parser must be in the fast path's tables (or make every
    command line go to argparse, which this test reports)."""
    build = cli._parser()._subparsers._group_actions[0].choices["build"]  # type: ignore[union-attr]  # argparse internals
    options = {s for action in build._actions for s in action.option_strings}
    known = set(cli._FAST_VALUES) | set(cli._FAST_SWITCHES)
    typed = {"--add-host", "--shm-size"}  # their values are checked by argparse's types
    assert options - known - typed - {"-h", "--help"} == set()
    assert cli._fast_build_args(["build", "."]) is not None
