"""Random and mutated Dockerfiles through the parser and the converter: whatever the
input, the only thing that may come out besides a result is a DockbuildError."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockbuild.errors import DockbuildError
from dockbuild.frontend import parser
from dockbuild.frontend.convert import ConvertOptions, NamedSource, dockerfile_to_llb

SEEDS = [
    "FROM base\nRUN echo hi\n",
    "# syntax=docker/dockerfile:1\n# escape=`\nFROM base AS build\nRUN echo `\n  hi\n",
    "ARG V=1\nFROM base:$V AS a\nENV A=1 B=${A:-x}\nLABEL k=v\nCOPY --from=a /x /y\n",
    "FROM base\nRUN <<EOF\n#!/bin/sh\necho hi\nEOF\nCOPY <<-'X' /f\n\tdata $A\nX\n",
    'FROM base\nHEALTHCHECK --interval=5s --retries=2 CMD ["true"]\nEXPOSE 80-81/udp\n',
    'FROM scratch\nONBUILD RUN echo x\nWORKDIR a/b\nUSER 1:2\nVOLUME ["/v"]\nSTOPSIGNAL 9\n',
    'FROM base\nRUN --mount=type=cache,target=/c --network=none echo\nSHELL ["/bin/sh", "-c"]\n',
    'FROM base AS x\nFROM x\nCMD echo\nENTRYPOINT ["e"]\nMAINTAINER m\nADD --chmod=755 a /b\n',
]
WORDS = [
    "FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "LABEL", "CMD", "ENTRYPOINT", "WORKDIR", "USER",
    "EXPOSE", "VOLUME", "SHELL", "ONBUILD", "HEALTHCHECK", "STOPSIGNAL", "MAINTAINER", "AS",
    "--from=", "--mount=", "--chown=", "--chmod=", "--platform=", "<<EOF", "<<-'E'", "EOF", "$",
    "${", "}", "${A:-", ":+", "#", "\\", "`", "\"", "'", "[", "]", ",", "=", " ", "\n", "\t",
    "scratch", "base", "0", "1", "-", "/", "*", "NONE", "CMD-SHELL",
]  # fmt: skip


def _image(ref: str, platform: str) -> NamedSource:
    if "bad" in ref:
        raise DockbuildError(f"{ref}: not found")
    config = {
        "config": {"Env": ["PATH=/bin"], "OnBuild": ["RUN echo trigger"] if "ob" in ref else None}
    }
    return NamedSource("image", f"docker-image://{ref}@sha256:{'0' * 64}", config, ref)


def _convert(text: str, **options: Any) -> None:
    with contextlib.suppress(DockbuildError):
        parser.dump(parser.parse(text))
    with contextlib.suppress(DockbuildError):
        dockerfile_to_llb(text, ConvertOptions(**options), lambda name, platform: None, _image)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(0, 6))):
        pos = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "swap"]))
        if kind == "insert":
            text = text[:pos] + draw(st.sampled_from(WORDS)) + text[pos:]
        elif kind == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 8)) :]
        else:
            text = text[pos:] + text[:pos]
    return text


# FUZZ_EXAMPLES=5000 for a longer hunt; the suite keeps it quick.
_SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)


@_SETTINGS
@given(
    mutated(),
    st.sampled_from([None, "a", "x", "0"]),
    st.dictionaries(
        st.sampled_from(["V", "A", "BUILDKIT_DOCKERFILE_CHECK", "HTTP_PROXY"]),
        st.text(max_size=8),
        max_size=2,
    ),
)
def test_mutated_dockerfiles_raise_nothing_but_dockbuild_errors(
    text: str, target: str | None, build_args: dict[str, str]
) -> None:
    _convert(text, target=target, build_args=build_args)


@_SETTINGS
@given(st.lists(st.sampled_from(WORDS), max_size=40).map("".join))
def test_random_token_soup_raises_nothing_but_dockbuild_errors(text: str) -> None:
    _convert(text)


@_SETTINGS
@given(st.text(max_size=200))
def test_random_text_raises_nothing_but_dockbuild_errors(text: str) -> None:
    _convert("FROM base\n" + text)
