"""BuildKit's own word-expansion tables (shell/envVarTest, shell/wordsTest), line by line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from conformance_data import BUILDKIT_DATA, PRESENT, conformance

from dockbuild.frontend.shell import Lex, ShellError

DATA = BUILDKIT_DATA
pytestmark = conformance

# The environment BuildKit's TestShellParser4EnvVars expands envVarTest with.
ENV_VAR_TEST_ENV = ["PWD=/home", "SHELL=bash", "KOREAN=한국어", "NULL="]


@dataclass(frozen=True)
class EnvVarCase:
    line: int
    source: str
    expected: str  # the word, or "error"


@dataclass(frozen=True)
class WordsCase:
    line: int
    source: str
    expected: list[str]  # the words, or ["error"]
    env: tuple[str, ...]  # the ENV lines above this one


def read_env_var_test(path: Path) -> tuple[list[EnvVarCase], list[int]]:
    """The cases that apply on Unix (A and U lines), and the numbers of the skipped W lines."""
    cases: list[EnvVarCase] = []
    windows_only: list[int] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if raw.startswith("#"):
            continue
        line = raw.strip()
        if not line:
            continue
        fields = line.split("|")
        assert len(fields) == 3, f"{path.name}:{number}: want P|input|expected, got {raw!r}"
        platform, source, expected = (field.strip() for field in fields)
        assert platform in ("A", "U", "W"), f"{path.name}:{number}: unknown platform {platform!r}"
        if platform == "W":
            windows_only.append(number)
        else:
            cases.append(EnvVarCase(number, source, expected))
    return cases, windows_only


def read_words_test(path: Path) -> list[WordsCase]:
    cases: list[WordsCase] = []
    env: list[str] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if raw.startswith("#") or not raw.strip():
            continue
        if raw.startswith("ENV "):
            # Trailing white space is part of the value ("ENV trailing=ab c   ").
            env.append(raw[3:].lstrip(" "))
            continue
        fields = raw.split("|")
        assert len(fields) == 2, f"{path.name}:{number}: want input | w1,w2, got {raw!r}"
        cases.append(
            WordsCase(number, fields[0].strip(), fields[1].lstrip(" ").split(","), tuple(env))
        )
    return cases


ENV_VAR_CASES, WINDOWS_ONLY_LINES = read_env_var_test(DATA / "envVarTest") if PRESENT else ([], [])
WORDS_CASES = read_words_test(DATA / "wordsTest") if PRESENT else []


def test_env_var_table_is_read_whole() -> None:
    # Every line is either a case, a skipped Windows case, a comment or blank.
    lines = (DATA / "envVarTest").read_text(encoding="utf-8").splitlines()
    comments_and_blanks = sum(1 for line in lines if line.startswith("#") or not line.strip())
    assert len(ENV_VAR_CASES) + len(WINDOWS_ONLY_LINES) + comments_and_blanks == len(lines)
    assert len(WINDOWS_ONLY_LINES) == 2


@pytest.mark.parametrize(
    "case", ENV_VAR_CASES, ids=[f"envVarTest:{c.line}:{c.source}" for c in ENV_VAR_CASES]
)
@pytest.mark.parametrize("env_form", ["list", "dict"])
def test_env_var_test_line(case: EnvVarCase, env_form: str) -> None:
    # BuildKit checks each line with the env as a K=V slice and as a map; so do we.
    env: list[str] | dict[str, str] = list(ENV_VAR_TEST_ENV)
    if env_form == "dict":
        env = dict(entry.split("=", 1) for entry in ENV_VAR_TEST_ENV)
    lex = Lex("\\")
    if case.expected == "error":
        with pytest.raises(ShellError):
            lex.process_word(case.source, env)
    else:
        assert lex.process_word(case.source, env) == case.expected


@pytest.mark.parametrize(
    "case", WORDS_CASES, ids=[f"wordsTest:{c.line}:{c.source}" for c in WORDS_CASES]
)
def test_words_test_line(case: WordsCase) -> None:
    lex = Lex("\\")
    try:
        words = lex.process_words(case.source, list(case.env))
    except ShellError:
        words = ["error"]
    assert words == case.expected
