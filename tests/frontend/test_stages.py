"""Stages: the split of a Dockerfile, the stage table and the meta ARG scope."""

from __future__ import annotations

import pytest

from dockbuild.errors import DockerfileError
from dockbuild.frontend.checks import Linter
from dockbuild.frontend.instructions import EnvCommand, RunCommand
from dockbuild.frontend.parser import parse
from dockbuild.frontend.shell import Lex
from dockbuild.frontend.stages import (
    StageState,
    meta_arg_scope,
    parse_stages,
    similar_stage,
    stage_by_name,
    stage_by_ref,
    target_stage,
)


def table(text: str) -> list[StageState]:
    specs, _ = parse_stages(parse(text))
    return [StageState(spec) for spec in specs]


def test_parse_stages_collects_meta_args_and_stages() -> None:
    stages, meta = parse_stages(
        parse("ARG V=1\nARG B\nFROM alpine:$V AS base\nRUN x\nFROM base\nENV a=b\n")
    )

    assert [arg.args for arg in meta] == [(("V", "1"),), (("B", None),)]
    assert [(s.name, s.base_name, s.index) for s in stages] == [
        ("base", "alpine:$V", 0),
        ("", "base", 1),
    ]
    assert [type(c) for c in stages[0].commands] == [RunCommand]
    assert [type(c) for c in stages[1].commands] == [EnvCommand]
    assert stages[1].location.start_line == 5


def test_a_repeated_stage_name_means_the_last_one_and_from_sees_only_earlier_stages() -> None:
    stages = table("FROM a AS build\nFROM b AS build\nFROM build AS app\n")

    assert stage_by_name(stages, "BUILD") is stages[1]
    assert stage_by_name(stages, "build", before=1) is stages[0]
    assert stage_by_name(stages, "app", before=2) is None


def test_from_refs_name_a_stage_by_index() -> None:
    stages = table("FROM a AS one\nFROM b\n")

    assert stage_by_ref(stages, "1") is stages[1]
    assert stage_by_ref(stages, "one") is stages[0]
    with pytest.raises(DockerfileError, match="invalid stage index 2"):
        stage_by_ref(stages, "2")


def test_the_target_is_the_last_stage_or_the_named_one_with_a_suggestion() -> None:
    stages = table("FROM a AS build\nFROM b AS test\n")

    assert target_stage(stages, None) is stages[1]
    assert target_stage(stages, "Build") is stages[0]
    with pytest.raises(
        DockerfileError, match=r'"biuld" could not be found \(did you mean build\?\)'
    ):
        target_stage(stages, "biuld")


def test_similar_stage_names_a_close_stage_above_a_limit() -> None:
    stages = table("FROM a AS build\nFROM b AS test\nFROM c AS tests\n")

    assert similar_stage(stages, "builder") == "build"
    assert similar_stage(stages, "tset") == "test"
    assert similar_stage(stages, "tests2", before=2) == "test"
    assert similar_stage(stages, "release") == ""


def test_meta_args_take_build_args_and_expand_their_defaults() -> None:
    specs, meta = parse_stages(parse("ARG V=1\nARG IMG=alpine:$V\nARG X\nFROM $IMG\n"))
    stages = [StageState(spec) for spec in specs]

    scope = meta_arg_scope(
        meta, stages[0], ("linux/arm/v7", "linux/amd64"), {"V": "2"}, Lex("\\"), Linter()
    )

    assert scope.scope["IMG"] == "alpine:2" and scope.scope["X"] is None
    assert scope.defaults["IMG"] == "alpine:1"
    assert scope.used == {"V"} and scope.names == {"V", "IMG", "X"}
    assert (scope.scope["TARGETARCH"], scope.scope["TARGETVARIANT"]) == ("arm", "v7")
    assert (scope.scope["BUILDPLATFORM"], scope.scope["BUILDVARIANT"]) == ("linux/amd64", "")
