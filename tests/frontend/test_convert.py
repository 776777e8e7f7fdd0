"""The converter as BuildKit's dockerfile2llb: stages, ARG scoping, ONBUILD, the image
config and history. Stub resolvers stand in for registries, so these run anywhere."""

from __future__ import annotations

from typing import Any

import pytest

from dockbuild import llb
from dockbuild.errors import DockerfileError, RegistryError, RegistryUnreachableError
from dockbuild.frontend.convert import (
    ConvertOptions,
    Definition,
    NamedSource,
    dockerfile_to_llb,
)

BASE_CONFIG: dict[str, Any] = {
    "architecture": "amd64",
    "os": "linux",
    "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]},
    "history": [{"created_by": "base layer"}],
}


class Images:
    """A registry stand-in: every name resolves to a pinned image with a given config."""

    def __init__(self, configs: dict[str, dict[str, Any]] | None = None) -> None:
        self.configs = configs or {}
        self.resolved: list[str] = []

    def __call__(self, ref: str, platform: str = "linux/amd64") -> NamedSource:
        self.resolved.append(ref)
        if ref.startswith("missing"):
            raise DockerfileError(f"{ref}: not found")
        config = self.configs.get(ref, BASE_CONFIG)
        return NamedSource("image", f"docker-image://{ref}@sha256:{'a' * 64}", config, ref)


def convert(text: str, images: Images | None = None, **options: Any) -> Definition:
    return dockerfile_to_llb(text, ConvertOptions(**options), lambda name, platform: None, images or Images())


def history(d: Definition) -> list[tuple[str, bool]]:
    """The entries this Dockerfile added (after the base image's): (created_by, empty)."""
    return [(h["created_by"], bool(h.get("empty_layer"))) for h in d.image_config["history"][1:]]


def config(d: Definition) -> dict[str, Any]:
    return d.image_config["config"]


def ops(d: Definition) -> list[llb.Op]:
    return list(llb.walk(d.root)) if d.root is not None else []


# -- history and config, as BuildKit writes them ----------------------------------------------


def test_metadata_instructions_write_buildkit_history_text() -> None:
    d = convert(
        "FROM base\n"
        "ENV A=1 B=$A\n"
        "LABEL l=$A\n"
        "ARG X=x1\n"
        "ARG Y\n"
        "USER nobody:nogroup\n"
        'SHELL ["/bin/ash", "-eo", "pipefail", "-c"]\n'
        "CMD echo hi\n"
        'ENTRYPOINT ["/bin/run", "a b"]\n'
        "VOLUME /data /cache\n"
        "EXPOSE 80 53/udp\n"
        "STOPSIGNAL SIGTERM\n"
        "HEALTHCHECK --interval=90s --retries=3 CMD curl -f http://x/\n"
        "MAINTAINER me\n"
    )
    assert history(d) == [
        ("ENV A=1 B=", True),
        ("LABEL l=1", True),
        ("ARG X=x1", True),
        ("ARG Y", True),
        ("USER nobody:nogroup", True),
        ("SHELL [/bin/ash -eo pipefail -c]", True),
        ('CMD ["/bin/ash" "-eo" "pipefail" "-c" "echo hi"]', True),
        ('ENTRYPOINT ["/bin/run" "a b"]', True),
        ("VOLUME [/data /cache]", True),
        ("EXPOSE [53/udp 80/tcp]", True),  # BuildKit sorts the words
        ("STOPSIGNAL SIGTERM", True),
        (
            "HEALTHCHECK {Test:[CMD-SHELL curl -f http://x/] Interval:1m30s Timeout:0s "
            "StartPeriod:0s StartInterval:0s Retries:3}",
            True,
        ),
        ("MAINTAINER me", True),
    ]
    c = config(d)
    assert c["Env"] == ["PATH=/bin", "A=1", "B="]
    assert c["Labels"] == {"l": "1"}
    assert c["User"] == "nobody:nogroup"
    assert c["Volumes"] == {"/data": {}, "/cache": {}}
    assert c["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}}
    assert c["Healthcheck"] == {
        "Test": ["CMD-SHELL", "curl -f http://x/"],
        "Interval": 90_000_000_000,
        "Retries": 3,
    }
    assert d.image_config["author"] == "me"
    # The base image's own history stays in front.
    assert d.image_config["history"][0] == {"created_by": "base layer"}


def test_arg_history_shows_the_value_in_effect() -> None:
    d = convert(
        "ARG G=global\nFROM base\nARG G\nARG B=default\nARG C=$B-c\n",
        build_args={"B": "given"},
    )
    assert [h for h, _ in history(d)] == ["ARG G=global", "ARG B=given", "ARG C=given-c"]


def test_cmd_sets_args_escaped_and_entrypoint_resets_an_inherited_cmd() -> None:
    inherited = convert('FROM base\nENTRYPOINT ["/e"]\n')
    assert config(inherited)["Entrypoint"] == ["/e"]
    assert config(inherited)["Cmd"] is None  # the base image's CMD ["sh"] is gone
    same_stage = convert('FROM base\nCMD ["c"]\nENTRYPOINT ["/e"]\n')
    assert config(same_stage)["Cmd"] == ["c"]
    assert config(same_stage)["ArgsEscaped"] is True


def test_entrypoint_from_a_parent_stage_cmd_is_reset_in_the_child() -> None:
    d = convert('FROM base AS p\nCMD ["c"]\nFROM p\nENTRYPOINT ["/e"]\n')
    assert config(d)["Cmd"] is None


def test_shell_applies_to_shell_form_run_cmd_and_entrypoint() -> None:
    d = convert('FROM base\nSHELL ["/bin/bash", "-c"]\nRUN echo a\nENTRYPOINT echo b\n')
    run = next(op for op in ops(d) if isinstance(op, llb.ExecOp))
    assert run.args == ("/bin/bash", "-c", "echo a")
    assert config(d)["Entrypoint"] == ["/bin/bash", "-c", "echo b"]


def test_default_path_is_added_only_when_the_base_has_none() -> None:
    assert config(convert("FROM scratch\nENV A=1\n"))["Env"] == [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "A=1",
    ]
    no_path = Images({"nopath": {"config": {"Env": ["HOME=/root"]}}})
    env = config(convert("FROM nopath\n", no_path))["Env"]
    assert env == [
        "HOME=/root",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]
    assert config(convert("FROM base\n"))["Env"] == ["PATH=/bin"]


def test_labels_merge_and_cli_labels_win() -> None:
    parent = Images({"labelled": {"config": {"Labels": {"a": "base", "b": "base"}}}})
    d = convert("FROM labelled\nLABEL b=file c=file\n", parent, labels={"c": "cli"})
    assert config(d)["Labels"] == {"a": "base", "b": "file", "c": "cli"}


def test_workdir_joins_relative_paths_and_creates_the_directory_as_user() -> None:
    d = convert("FROM base\nUSER app\nWORKDIR /srv\nWORKDIR app/../data\n")
    assert config(d)["WorkingDir"] == "/srv/data"
    mkdirs = [a for op in ops(d) if isinstance(op, llb.FileOp) for a in op.actions]
    assert {(m.path, m.chown) for m in mkdirs} == {
        ("/srv", llb.Chown("app")),
        ("/srv/data", llb.Chown("app")),
    }
    assert history(d)[-1] == ("WORKDIR /srv/data", False)


def test_workdir_root_adds_no_layer() -> None:
    d = convert("FROM base\nWORKDIR /\n")
    assert d.root is not None and isinstance(d.root, llb.SourceOp)
    assert history(d) == [("WORKDIR /", True)]


def test_onbuild_is_stored_without_history() -> None:
    d = convert("FROM base\nONBUILD RUN echo later\nONBUILD COPY a /a\n")
    assert config(d)["OnBuild"] == ["RUN echo later", "COPY a /a"]
    assert history(d) == []


def test_stopsignal_must_name_a_signal() -> None:
    assert config(convert("FROM base\nSTOPSIGNAL 9\n"))["StopSignal"] == "9"
    assert config(convert("FROM base\nSTOPSIGNAL kill\n"))["StopSignal"] == "kill"
    with pytest.raises(DockerfileError, match="Invalid signal: SIGNOPE") as err:
        convert("FROM base\n\nSTOPSIGNAL SIGNOPE\n")
    assert err.value.location is not None and err.value.location.start_line == 3


def test_expose_ranges_protocols_and_errors() -> None:
    d = convert("FROM base\nEXPOSE 8000-8002/UDP 1.2.3.4:80:81\n")
    assert sorted(config(d)["ExposedPorts"]) == ["8000/udp", "8001/udp", "8002/udp", "81/tcp"]
    with pytest.raises(DockerfileError, match="invalid proto: xyz"):
        convert("FROM base\nEXPOSE 80/xyz\n")
    with pytest.raises(DockerfileError, match="invalid containerPort"):
        convert("FROM base\nEXPOSE 70000\n")


# -- ARG scoping and build args ------------------------------------------------------------


def run_env(d: Definition) -> dict[str, str]:
    run = next(op for op in ops(d) if isinstance(op, llb.ExecOp))
    return dict(item.partition("=")[::2] for item in run.env)


def test_meta_args_are_visible_in_a_stage_only_when_redeclared() -> None:
    d = convert("ARG V=1\nFROM base\nRUN echo\n")
    assert "V" not in run_env(d)
    d = convert("ARG V=1\nFROM base\nARG V\nRUN echo\n")
    assert run_env(d)["V"] == "1"


def test_build_arg_beats_default_and_env_beats_arg() -> None:
    d = convert("FROM base\nARG A=default\nENV A=env\nLABEL a=$A\n", build_args={"A": "cli"})
    assert config(d)["Labels"] == {"a": "env"}
    d = convert("FROM base\nARG A=default\nLABEL a=$A\n", build_args={"A": "cli"})
    assert config(d)["Labels"] == {"a": "cli"}


def test_args_are_inherited_by_stages_built_from_a_stage() -> None:
    d = convert("FROM base AS p\nARG A=1\nFROM p\nLABEL a=$A\n")
    assert config(d)["Labels"] == {"a": "1"}


def test_automatic_platform_args_are_global_and_target_stage_is_set() -> None:
    d = convert(
        "FROM base AS build\nARG TARGETARCH\nARG TARGETSTAGE\nARG BUILDPLATFORM\n"
        "LABEL arch=$TARGETARCH stage=$TARGETSTAGE bp=$BUILDPLATFORM os=$TARGETOS\n",
    )
    assert config(d)["Labels"] == {"arch": "amd64", "stage": "build", "bp": "linux/amd64", "os": ""}


def test_base_name_expands_global_args_with_build_arg_precedence() -> None:
    images = Images()
    convert("ARG TAG=1\nFROM img:$TAG\n", images)
    convert("ARG TAG=1\nFROM img:${TAG}\n", images, build_args={"TAG": "2"})
    assert images.resolved == ["img:1", "img:2"]


def test_proxy_args_reach_run_but_not_history_or_the_digest() -> None:
    plain = convert("FROM base\nRUN echo\n")
    proxied = convert("FROM base\nRUN echo\n", build_args={"HTTP_PROXY": "http://proxy:3128"})
    run = next(op for op in ops(proxied) if isinstance(op, llb.ExecOp))
    assert "HTTP_PROXY=http://proxy:3128" in run.proxy_env
    assert proxied.root is not None and plain.root is not None
    assert proxied.root.digest == plain.root.digest
    assert all("proxy" not in h for h, _ in history(proxied))
    assert not any("HTTP_PROXY" in w for w in proxied.warnings)


def test_a_declared_proxy_arg_is_in_history_and_the_run_env() -> None:
    d = convert("FROM base\nARG HTTP_PROXY\nRUN echo\n", build_args={"HTTP_PROXY": "http://p:1"})
    run = next(op for op in ops(d) if isinstance(op, llb.ExecOp))
    assert "HTTP_PROXY=http://p:1" in run.env
    assert run.proxy_env == ("http_proxy=http://p:1",)  # the other spelling, as BuildKit
    assert history(d)[-1][0] == "RUN |1 HTTP_PROXY=http://p:1 /bin/sh -c echo # buildkit"


def test_run_env_is_buildkits_state_env_latest_assignment_last() -> None:
    d = convert("FROM base\nENV X=env Y=1\nARG X=arg\nARG Z\nENV Y=2\nRUN echo\n")
    run = next(op for op in ops(d) if isinstance(op, llb.ExecOp))
    assert run.env == ("PATH=/bin", "X=arg", "Y=2")  # an ARG without a value sets nothing
    assert "X=env" in config(d)["Env"]  # the image keeps the ENV value
    assert history(d)[-1][0] == "RUN |2 X=arg Z= /bin/sh -c echo # buildkit"


def test_sandbox_hostname_build_arg_is_every_runs_hostname() -> None:
    d = convert("FROM base\nRUN a\nRUN b\n", build_args={"BUILDKIT_SANDBOX_HOSTNAME": "h1"})
    hosts = {op.hostname for op in ops(d) if isinstance(op, llb.ExecOp)}
    assert hosts == {"h1"} and not d.warnings
    plain = convert("FROM base\nRUN a\n")
    assert {op.hostname for op in ops(plain) if isinstance(op, llb.ExecOp)} == {"buildkitsandbox"}


def test_unused_build_args_are_reported() -> None:
    d = convert("FROM base\nARG USED\n", build_args={"USED": "1", "UNUSED": "2"})
    assert "WARNING: One or more build-args [UNUSED] were not consumed" in d.warnings


# -- stages ------------------------------------------------------------------------------------


def test_only_the_stages_the_target_needs_are_converted() -> None:
    images = Images()
    d = convert(
        "FROM missing-unused AS unused\nRUN exit 1\n"
        "FROM base AS dep\nRUN echo dep\n"
        "FROM base\nCOPY --from=DEP /x /x\n",
        images,
    )
    assert "missing-unused" not in images.resolved
    assert sum(isinstance(op, llb.ExecOp) for op in ops(d)) == 1


def test_target_selects_a_stage_case_insensitively_and_suggests_names() -> None:
    d = convert("FROM base AS first\nLABEL s=first\nFROM base\nLABEL s=last\n", target="FIRST")
    assert config(d)["Labels"] == {"s": "first"}
    with pytest.raises(
        DockerfileError, match=r'target stage "frist" could not be found \(did you mean first\?\)'
    ):
        convert("FROM base AS first\n", target="frist")


def test_copy_from_a_stage_index_and_name() -> None:
    d = convert("FROM base AS a\nRUN echo a\nFROM base\nCOPY --from=0 /a /a\n")
    copy_op = d.root
    assert isinstance(copy_op, llb.FileOp)
    source = copy_op.actions[0].source  # type: ignore[union-attr]
    assert isinstance(source, llb.ExecOp) and source.args[-1] == "echo a"


def test_copy_from_a_later_stage_is_an_error_naming_the_line() -> None:
    with pytest.raises(DockerfileError, match='cannot copy from stage "later"') as err:
        convert("FROM base AS first\nCOPY --from=later /a /a\nFROM base AS later\n", target="first")
    assert err.value.location is not None and err.value.location.start_line == 2


def test_variables_in_copy_from_are_refused_as_in_buildkit() -> None:
    with pytest.raises(DockerfileError, match="variable expansion is not supported for --from"):
        convert("ARG S=a\nFROM base AS a\nFROM base\nCOPY --from=$S /a /a\n")


def test_cycles_are_errors_even_in_unused_stages() -> None:
    with pytest.raises(DockerfileError, match="circular dependency detected on stage: a"):
        convert(
            "FROM base AS a\nCOPY --from=b /b /b\nFROM base AS b\nCOPY --from=a /a /a\nFROM base\n"
        )


def test_from_names_only_earlier_stages() -> None:
    images = Images()
    convert("FROM later AS first\nFROM base AS later\n", images, target="first")
    assert images.resolved[0] == "later"  # not the stage below: an image


def test_blank_base_name_is_an_error() -> None:
    with pytest.raises(DockerfileError, match=r"base name \(\$NONE\) should not be blank"):
        convert("FROM $NONE\n")


def test_invalid_stage_index_is_an_error() -> None:
    with pytest.raises(DockerfileError, match="invalid stage index 5"):
        convert("FROM base\nCOPY --from=5 /a /a\n")


# -- ONBUILD -----------------------------------------------------------------------------------


def test_onbuild_triggers_of_a_base_image_run_first_and_are_cleared() -> None:
    images = Images({"parent": {"config": {"OnBuild": ["RUN echo trigger", "LABEL t=1"]}}})
    d = convert("FROM parent\nRUN echo own\n", images)
    runs = [op.args[-1] for op in ops(d) if isinstance(op, llb.ExecOp)]
    assert runs == ["echo trigger", "echo own"]
    assert "OnBuild" not in config(d)
    assert config(d)["Labels"] == {"t": "1"}
    created_by = [h["created_by"] for h in d.image_config["history"]]
    assert created_by[:2] == ["RUN /bin/sh -c echo trigger # buildkit", "LABEL t=1"]


def test_onbuild_triggers_of_a_parent_stage_run_in_the_child_only() -> None:
    d = convert("FROM base AS parent\nONBUILD RUN echo t\nFROM parent\nRUN echo child\n")
    runs = [op.args[-1] for op in ops(d) if isinstance(op, llb.ExecOp)]
    assert runs == ["echo t", "echo child"]
    assert "OnBuild" not in config(d)


def test_onbuild_copy_from_may_name_a_stage_of_the_downstream_build() -> None:
    images = Images({"parent": {"config": {"OnBuild": ["COPY --from=assets /a /a"]}}})
    d = convert("FROM base AS assets\nRUN echo assets\nFROM parent\n", images)
    runs = [op.args[-1] for op in ops(d) if isinstance(op, llb.ExecOp)]
    assert runs == ["echo assets"]


def test_a_bad_onbuild_trigger_names_the_from_line() -> None:
    images = Images({"parent": {"config": {"OnBuild": ["FROBNICATE x"]}}})
    with pytest.raises(DockerfileError, match="unknown instruction") as err:
        convert("FROM base\nFROM parent\n", images)
    assert err.value.location is not None and err.value.location.start_line == 2


# -- RUN heredocs ------------------------------------------------------------------------------


def test_heredoc_with_a_shebang_runs_as_a_file_under_dev_pipes() -> None:
    d = convert("FROM base\nRUN <<EOF\n#!/bin/busybox sh\necho hi\nEOF\n")
    run = d.root
    assert isinstance(run, llb.ExecOp)
    assert run.args == ("/bin/sh", "-c", "/dev/pipes/EOF")
    (pipes,) = [m for m in run.mounts if m.target == "/dev/pipes"]
    assert pipes.readonly
    assert isinstance(pipes.input, llb.FileOp)
    (script,) = pipes.input.actions
    assert isinstance(script, llb.Mkfile)
    assert script.data == b"#!/bin/busybox sh\necho hi\n" and script.mode == 0o755


def test_heredoc_without_a_shebang_is_passed_to_the_shell() -> None:
    d = convert("FROM base\nRUN <<EOF\necho a\necho b\nEOF\n")
    assert isinstance(d.root, llb.ExecOp)
    assert d.root.args == ("/bin/sh", "-c", "echo a\necho b\n")


def test_a_heredoc_with_a_command_after_it_runs_as_a_script() -> None:
    # `<<EOF cat > /out` is not a lone heredoc (MustParseHeredoc gives nil): the line and
    # the body go to the shell together, so `cat` reads the body.
    d = convert("FROM base\nRUN <<EOF cat > /out\nhello\nEOF\n")
    assert isinstance(d.root, llb.ExecOp)
    assert d.root.args == ("/bin/sh", "-c", "<<EOF cat > /out\nhello\nEOF")
    tabs = convert("FROM base\nRUN <<-EOF cat\n\thello\n\tEOF\n")
    assert isinstance(tabs.root, llb.ExecOp)  # the shell strips the tabs of <<-
    assert tabs.root.args == ("/bin/sh", "-c", "<<-EOF cat\n\thello\nEOF")


# -- checks ------------------------------------------------------------------------------------


def rules(d: Definition) -> list[str]:
    return [w.rule for w in d.checks]


def test_checks_report_buildkit_rule_names_with_lines() -> None:
    d = convert("FROM base AS Build\nCMD echo a\nWORKDIR rel\nENV k v\nCOPY $NOPE /x\n")
    assert set(rules(d)) >= {
        "StageNameCasing", "JSONArgsRecommended", "WorkdirRelativePath", "LegacyKeyValueFormat",
        "UndefinedVar",
    }  # fmt: skip
    lines = {w.rule: w.location.start_line for w in d.checks if w.location}
    assert lines["WorkdirRelativePath"] == 3
    assert (
        "WARNING: JSONArgsRecommended: JSON arguments recommended for CMD to prevent "
        "unintended behavior related to OS signals (line 2)" in d.warnings
    )


def test_check_directive_skips_rules_and_can_fail_the_build() -> None:
    text = "FROM base AS Build\nCMD echo a\n"
    skipped = convert("# check=skip=StageNameCasing,JSONArgsRecommended\n" + text)
    assert rules(skipped) == []
    assert rules(convert("# check=skip=all\n" + text)) == []
    with pytest.raises(DockerfileError, match="lint violation found for rules: StageNameCasing"):
        convert("# check=error=true\n" + text)
    by_arg = convert(text, build_args={"BUILDKIT_DOCKERFILE_CHECK": "skip=all"})
    assert rules(by_arg) == [] and not any("not consumed" in w for w in by_arg.warnings)


def test_invalid_definition_description_is_experimental() -> None:
    text = "# base the stage\nFROM base AS base\n# some words\nARG A=1 B\n# A is one\nARG A\n"
    assert "InvalidDefinitionDescription" not in rules(convert(text))
    d = convert("# check=experimental=InvalidDefinitionDescription\n" + text)
    (warning,) = [w for w in d.checks if w.rule == "InvalidDefinitionDescription"]
    assert (
        warning.message == "Comment for ARG should follow the format: `# <arg_key> <description>`"
    )
    assert warning.location is not None and warning.location.start_line == 5


def test_copy_ignored_file_is_experimental_and_skipped_with_exceptions() -> None:
    text = "FROM base\nCOPY ./skip/me keep /\nCOPY --from=base skip /\n"
    options = {"exclude_patterns": ("skip",), "is_ignored": lambda p: p.split("/")[0] == "skip"}
    assert "CopyIgnoredFile" not in rules(convert(text, **options))
    d = convert("# check=experimental=all\n" + text, **options)
    messages = [w.message for w in d.checks if w.rule == "CopyIgnoredFile"]
    assert messages == ['Attempting to Copy file "skip/me" that is excluded by .dockerignore']
    options["exclude_patterns"] = ("skip", "!skip/me")
    assert "CopyIgnoredFile" not in rules(convert("# check=experimental=all\n" + text, **options))


def test_undefined_arg_in_from_suggests_a_declared_one() -> None:
    d = convert("ARG VERSION=1\nFROM img:${VERSOIN}-x\n")
    (warning,) = [w for w in d.checks if w.rule == "UndefinedArgInFrom"]
    assert warning.message == "FROM argument 'VERSOIN' is not declared (did you mean VERSION?)"


def test_casing_rules() -> None:
    d = convert("FROM base as b\nrun echo\nRUN echo\nRUN echo\n")
    assert rules(d).count("FromAsCasing") == 1
    assert rules(d).count("ConsistentInstructionCasing") == 1


def test_duplicate_and_reserved_stage_names() -> None:
    d = convert("FROM base AS a\nFROM base AS a\nFROM base AS context\n")
    assert {"DuplicateStageName", "ReservedStageName"} <= set(rules(d))


def test_secrets_in_arg_or_env_are_flagged() -> None:
    d = convert("FROM base\nARG GITHUB_TOKEN\nENV PUBLIC_KEY=x DB_PASSWORD=y\n")
    messages = [w.message for w in d.checks if w.rule == "SecretsUsedInArgOrEnv"]
    assert messages == [
        'Do not use ARG or ENV instructions for sensitive data (ARG "GITHUB_TOKEN")',
        'Do not use ARG or ENV instructions for sensitive data (ENV "DB_PASSWORD")',
    ]


def test_empty_continuation_lines_are_a_check_warning() -> None:
    d = convert("FROM base\nRUN echo a \\\n\n  b\n")
    assert rules(d) == ["NoEmptyContinuation"]


# -- errors --------------------------------------------------------------------------------------


def test_unknown_instruction_names_its_line_and_a_suggestion() -> None:
    with pytest.raises(
        DockerfileError, match=r"unknown instruction: RUNN \(did you mean RUN\?\)"
    ) as err:
        convert("FROM base\nRUNN echo\n")
    assert err.value.location is not None and err.value.location.start_line == 2


def test_empty_dockerfile_and_no_stages_are_errors() -> None:
    with pytest.raises(DockerfileError, match="the Dockerfile cannot be empty"):
        convert("")
    with pytest.raises(DockerfileError, match="file with no instructions"):
        convert("# only a comment\n")
    with pytest.raises(DockerfileError, match="dockerfile contains no stages to build"):
        convert("ARG A=1\n")


def test_from_platform_pins_the_stage_platform_and_rejects_bad_values() -> None:
    images = Images()
    d = convert(
        "FROM --platform=$BUILDPLATFORM base AS b\nFROM --platform=linux/aarch64 base\n",
        images,
        platform="linux/riscv64",
    )
    assert d.root is not None and isinstance(d.root, llb.SourceOp)
    assert d.root.platform == "linux/arm64"
    with pytest.raises(DockerfileError, match="empty platform value"):
        convert("FROM --platform=$NOPE base\n")
    with pytest.raises(DockerfileError, match="invalid platform") as err:
        convert("FROM base\nFROM --platform=linux/ base\n")
    assert err.value.location is not None and err.value.location.start_line == 2


CROSS = (
    "FROM --platform=$BUILDPLATFORM base AS tools\nRUN make-tools\n"
    "FROM --platform=$BUILDPLATFORM base AS build\nARG TARGETARCH\nRUN cc -o /out/app-$TARGETARCH\n"
    "FROM base\nARG TARGETPLATFORM\nCOPY --from=tools /t /t\nCOPY --from=build /out /out\nRUN ./test\n"
)


def _run_named(d: Definition, word: str) -> llb.ExecOp:
    return next(o for o in ops(d) if isinstance(o, llb.ExecOp) and word in o.args[-1])


def test_a_stage_that_does_not_depend_on_the_target_lowers_to_the_same_ops() -> None:
    amd = convert(CROSS, platform="linux/amd64", multi_platform=True)
    arm = convert(CROSS, platform="linux/arm64", multi_platform=True)
    # tools: the same ops for both platforms (solved once); build reads TARGETARCH
    assert _run_named(amd, "make-tools").digest == _run_named(arm, "make-tools").digest
    assert _run_named(amd, "cc -o").digest != _run_named(arm, "cc -o").digest
    assert "TARGETARCH=arm64" in _run_named(arm, "cc -o").env
    # The build platform's RUN carries no platform; the target stage's foreign RUN does.
    assert _run_named(arm, "make-tools").platform == ""
    assert _run_named(arm, "./test").platform == "linux/arm64"
    assert _run_named(amd, "./test").platform == ""


def test_several_platforms_name_each_step_with_its_platform_as_buildkit() -> None:
    arm = convert(CROSS, platform="linux/arm/v7", multi_platform=True)
    names = {o.name for o in ops(arm)}  # type: ignore[attr-defined]
    assert "[linux/amd64->arm/v7 build 2/2] RUN cc -o /out/app-$TARGETARCH" in names
    assert "[linux/arm/v7 stage-2 4/4] RUN ./test" in names
    # The `->` target comes from the step's TARGET* variables (BuildKit's platformFromEnv):
    # a build-platform stage that declares none has none, and a FROM never has one.
    assert "[linux/amd64 tools 2/2] RUN make-tools" in names
    assert "[linux/amd64 tools 1/2] FROM base" in names
    copied = convert("FROM scratch\nCOPY --from=img /x /x\n", platform="linux/arm64", multi_platform=True)
    assert "[img] FROM img" in {o.name for o in ops(copied)}  # type: ignore[attr-defined]
    other_os = convert(
        "FROM --platform=$BUILDPLATFORM base\nENV TARGETPLATFORM=windows/amd64\nRUN a\n"
        "ENV TARGETPLATFORM=linux/arm64/v8\nRUN b\nENV TARGETPLATFORM=linux/amd64/v3\nRUN c\n",
        platform="linux/arm64",
        multi_platform=True,
    )
    runs = [o.name for o in ops(other_os) if isinstance(o, llb.ExecOp)]  # type: ignore[attr-defined]
    assert set(runs) == {
        "[linux/amd64->windows/amd64 2/4] RUN a",
        "[linux/amd64->arm64 3/4] RUN b",
        "[linux/amd64 4/4] RUN c",  # the same architecture: no target named
    }
    single = convert(CROSS, platform="linux/arm64")
    assert "[stage-2 4/4] RUN ./test" in {o.name for o in ops(single)}  # type: ignore[attr-defined]


def test_platform_args_describe_the_build_and_the_target_platform() -> None:
    d = convert(
        "ARG TARGETARCH\nFROM base:$TARGETARCH\nARG TARGETPLATFORM\nARG TARGETVARIANT\nARG BUILDARCH\n"
        "LABEL t=$TARGETPLATFORM v=$TARGETVARIANT b=$BUILDARCH\n",
        platform="linux/arm/v7",
        build_platform="linux/amd64",
    )
    assert config(d)["Labels"] == {"t": "linux/arm/v7", "v": "v7", "b": "amd64"}


def test_images_resolve_for_their_stage_platform() -> None:
    images = Images()
    seen: list[tuple[str, str]] = []

    def resolve(ref: str, platform: str) -> NamedSource:
        seen.append((ref, platform))
        return images(ref, platform)

    dockerfile_to_llb(
        "FROM --platform=$BUILDPLATFORM gcc AS b\nFROM --platform=linux/arm/v6 x AS c\nFROM run\n"
        "COPY --from=b /a /a\nCOPY --from=c /a /a\n",
        ConvertOptions(platform="linux/riscv64"),
        lambda name, platform: None,
        resolve,
    )
    assert sorted(seen) == [("gcc", "linux/amd64"), ("run", "linux/riscv64"), ("x", "linux/arm/v6")]


def test_an_explicit_platform_sets_the_image_config_platform() -> None:
    d = convert("FROM base\n", platform="linux/arm/v7", explicit_platform=True)
    assert (d.image_config["architecture"], d.image_config["variant"]) == ("arm", "v7")
    d = convert("FROM scratch\n", platform="linux/arm64")
    assert d.image_config["architecture"] == "arm64" and "variant" not in d.image_config


def test_heredoc_run_steps_are_named_after_their_first_line() -> None:
    d = convert("FROM base\nRUN <<EOF\napt-get update\napt-get install x\nEOF\n")
    assert d.root is not None
    assert d.root.name == "[2/2] RUN <<EOF (apt-get update...)"  # type: ignore[attr-defined]


# -- what each stage owns, and image names that do not resolve ------------------------------


def test_stage_ops_are_each_stage_own_steps_by_name_and_index() -> None:
    d = convert(
        "FROM base AS a\nRUN one\nWORKDIR /w\n"
        "FROM a AS b\nCOPY --link x /x\nRUN two\n"
        "FROM base AS unused\nRUN three\n"
        "FROM b\nCOPY --from=a /w /w\n"
    )
    names = {key: [op.name for op in value] for key, value in d.stage_ops.items()}  # type: ignore[attr-defined]  # every step op has a name

    assert names["a"] == names["0"] == ["[a 2/3] RUN one", "[a 3/3] WORKDIR /w"]
    # --link makes a layer and the merge onto the stage: both are the step's
    assert names["b"] == ["[b 1/2] COPY --link x /x", "[b 1/2] COPY --link x /x", "[b 2/2] RUN two"]
    assert names["unused"] == [] and names["3"] == ["[stage-3 1/1] COPY --from=a /w /w"]


class Unreachable(Images):
    """Resolves `base` only: no registry answers for any other name."""

    def __call__(self, ref: str, platform: str = "linux/amd64") -> NamedSource:
        if ref == "base":
            return super().__call__(ref, platform)
        raise RegistryUnreachableError(f"docker.io/library/{ref}:latest: cannot reach registry")


def test_an_image_that_does_not_resolve_names_the_line_and_a_close_stage() -> None:
    with pytest.raises(RegistryUnreachableError) as caught:
        convert("FROM base AS build\nRUN x\nFROM base\nCOPY --from=builder /x /x\n", Unreachable())

    assert caught.value.location is not None and caught.value.location.start_line == 4
    assert caught.value.message == (
        '--from=builder: "builder" is not a stage (did you mean build?) nor an image: '
        "docker.io/library/builder:latest: cannot reach registry"
    )
    assert caught.value.hint is not None and "--build-context builder=" in caught.value.hint


def test_from_suggests_only_the_stages_above_it() -> None:
    with pytest.raises(RegistryError) as caught:
        convert("FROM biuld AS app\nFROM base AS build\n", Unreachable(), target="app")

    assert caught.value.location is not None and caught.value.location.start_line == 1
    assert "did you mean" not in caught.value.message


ARM64_BASE: dict[str, Any] = {**BASE_CONFIG, "architecture": "arm64", "variant": "v8"}


def test_a_base_of_another_platform_is_a_build_check_warning_not_an_error() -> None:
    images = Images({"armimg": ARM64_BASE})
    text = "FROM --platform=linux/arm64 armimg AS same\nFROM armimg\nCOPY --from=same / /\n"
    d = convert(text, images, platform="linux/amd64")
    (warning,) = [w for w in d.checks if w.rule != "FromPlatformFlagConstDisallowed"]
    assert warning.rule == "InvalidBaseImagePlatform" and warning.url == ""
    assert warning.location is not None and warning.location.start_line == 2
    assert warning.message == (
        'Base image armimg was pulled with platform "linux/arm64", expected "linux/amd64" '
        "for current build"
    )
    # The variant is not compared; a stage pinned to the base's platform is no mismatch.
    assert rules(convert("FROM armimg\n", images, platform="linux/arm64/v8.2")) == []
    # As in BuildKit the config's fields are compared as written: `aarch64` is no arm64.
    odd = Images({"odd": {**BASE_CONFIG, "architecture": "aarch64", "os.version": "1.0"}})
    (warning,) = convert("FROM odd\n", odd, platform="linux/arm64").checks
    assert 'pulled with platform "linux(1.0)/arm64", expected "linux/arm64"' in warning.message
    assert rules(convert("# check=skip=InvalidBaseImagePlatform\n" + text, images)) == [
        "FromPlatformFlagConstDisallowed"
    ]
    with pytest.raises(DockerfileError, match="lint violation found for rules: .*InvalidBaseImagePlatform"):
        convert("# check=error=true\n" + text, images)


def test_the_image_config_platform_follows_buildkit_for_a_foreign_base() -> None:
    images = Images({"armimg": ARM64_BASE, "arm6": {**BASE_CONFIG, "architecture": "arm", "variant": "v6"}})
    # Without --platform the base's platform stays, normalised (arm64/v8 is arm64).
    d = convert("FROM armimg\n", images, platform="linux/amd64")
    assert (d.image_config["architecture"], "variant" in d.image_config) == ("arm64", False)
    # --platform replaces it, variant included when the architecture differs.
    d = convert("FROM arm6\n", images, platform="linux/amd64", explicit_platform=True)
    assert (d.image_config["architecture"], "variant" in d.image_config) == ("amd64", False)
    # The same architecture asked without a variant keeps the base's.
    v82 = Images({"a": {**BASE_CONFIG, "architecture": "arm64", "variant": "v8.2"}})
    d = convert("FROM a\n", v82, platform="linux/arm64", explicit_platform=True)
    assert d.image_config["variant"] == "v8.2"
    d = convert("FROM arm6\n", images, platform="linux/arm/v7", explicit_platform=True)
    assert d.image_config["variant"] == "v7"
