"""Parsing typed instructions: flags, arguments and the checks BuildKit applies before building."""

from __future__ import annotations

import pytest

from dockbuild.errors import DockerfileError
from dockbuild.frontend.instructions import (
    AddCommand,
    ArgCommand,
    CmdCommand,
    CopyCommand,
    EntrypointCommand,
    EnvCommand,
    ExposeCommand,
    FromCommand,
    HealthcheckCommand,
    HeredocSource,
    InlineFile,
    Instruction,
    LabelCommand,
    MaintainerCommand,
    OnbuildCommand,
    RunCommand,
    ShellCommand,
    StopSignalCommand,
    UserCommand,
    VolumeCommand,
    WorkdirCommand,
)
from dockbuild.frontend.mounts import MountFlag, parse_mount
from dockbuild.frontend.parse_instructions import parse_instruction
from dockbuild.frontend.parser import parse
from dockbuild.frontend.stages import parse_stages


def instruction(text: str) -> Instruction:
    """The typed form of the last instruction in `text`."""
    return parse_instruction(parse(text).children[-1])


def rejects(text: str, match: str, line: int | None = None) -> DockerfileError:
    with pytest.raises(DockerfileError, match=match) as caught:
        parse_stages(parse(text))
    if line is not None:
        assert caught.value.location is not None
        assert caught.value.location.start_line == line
    return caught.value


# --- unknown instructions and flags ----------------------------------------------------


def test_unknown_instruction_is_rejected_with_a_suggestion_and_its_line() -> None:
    err = rejects("FROM a\n\nRUNN echo\n", "unknown instruction: RUNN", line=3)

    assert err.message == "unknown instruction: RUNN (did you mean RUN?)"


def test_unknown_instruction_far_from_any_name_gets_no_suggestion() -> None:
    err = rejects("FROM a\nFROBNICATE x\n", "unknown instruction")

    assert err.message == "unknown instruction: FROBNICATE"


def test_unknown_flag_is_rejected_with_a_suggestion() -> None:
    err = rejects("FROM a\nRUN --mout=type=cache,target=/x echo\n", "unknown flag", line=2)

    assert err.message == "unknown flag: --mout (did you mean mount?)"


def test_flag_unknown_to_the_instruction_is_rejected() -> None:
    rejects("FROM a\nCOPY --checksum=sha256:00 a b\n", "unknown flag: --checksum")


def test_boolean_flags_accept_bare_true_and_false() -> None:
    assert isinstance(copy := instruction("COPY --link a b\n"), CopyCommand) and copy.link
    assert isinstance(copy := instruction("COPY --link=TRUE a b\n"), CopyCommand) and copy.link
    assert isinstance(copy := instruction("COPY --link=false a b\n"), CopyCommand)
    assert not copy.link


def test_boolean_flag_with_other_value_or_empty_value_is_rejected() -> None:
    rejects("FROM a\nCOPY --link=maybe a b\n", "expecting boolean value for flag link")
    rejects("FROM a\nCOPY --link= a b\n", "missing a value on flag: link")


def test_string_flag_needs_a_value_and_may_not_repeat() -> None:
    rejects("FROM a\nCOPY --from a b\n", "missing a value on flag: from")
    rejects("FROM a\nCOPY --from=x --from=y a b\n", "duplicate flag specified: --from")


def test_list_flags_repeat() -> None:
    copy = instruction("COPY --exclude=*.md --exclude=.git . /src\n")

    assert isinstance(copy, CopyCommand)
    assert copy.exclude == ("*.md", ".git")


# --- FROM and stages -------------------------------------------------------------------


def test_from_with_platform_and_stage_name() -> None:
    from_ = instruction("FROM --platform=$BUILDPLATFORM golang:1.22 As Build\n")

    assert isinstance(from_, FromCommand)
    assert (from_.base_name, from_.stage_name, from_.platform) == (
        "golang:1.22",
        "build",
        "$BUILDPLATFORM",
    )


def test_from_rejects_invalid_stage_names_and_argument_counts() -> None:
    rejects("FROM a AS 1st\n", "invalid name for build stage: '1st'")
    rejects("FROM a AS b$c\n", "invalid name for build stage")
    rejects("FROM a b\n", "FROM requires either one or three arguments")
    rejects("FROM a TO b\n", "FROM requires either one or three arguments")


def test_instruction_other_than_arg_before_first_from_is_rejected() -> None:
    rejects("ARG a\nENV b=c\nFROM x\n", "no build stage in current context", line=2)


# --- RUN -------------------------------------------------------------------------------


def test_run_shell_form_is_one_string_with_prepend_shell() -> None:
    run = instruction("RUN echo $HOME && ls\n")

    assert isinstance(run, RunCommand)
    assert (run.cmd_line, run.prepend_shell) == (("echo $HOME && ls",), True)
    assert (run.network, run.security, run.mounts) == ("default", "sandbox", ())


def test_run_exec_form_keeps_the_array() -> None:
    run = instruction('RUN ["sh", "-c", "echo hi"]\n')

    assert isinstance(run, RunCommand)
    assert (run.cmd_line, run.prepend_shell) == (("sh", "-c", "echo hi"), False)


def test_run_heredoc_becomes_an_inline_file() -> None:
    run = instruction("RUN <<-EOF\n\techo hi\n\tEOF\n")

    assert isinstance(run, RunCommand)
    assert run.cmd_line == ("<<-EOF",)
    assert run.files == (InlineFile(name="EOF", data="\techo hi\n", chomp=True),)
    assert run.files[0].chomped_data == "echo hi\n"


def test_run_network_and_security_values_are_checked() -> None:
    run = instruction("RUN --network=host --security=insecure x\n")

    assert isinstance(run, RunCommand)
    assert (run.network, run.security) == ("host", "insecure")
    assert run.flags_used == ("network", "security")
    rejects("FROM a\nRUN --network=bridge x\n", "unsupported network mode 'bridge'")
    rejects("FROM a\nRUN --security=loose x\n", "unsupported security mode 'loose'")


def test_run_device_is_rejected_as_labs_only() -> None:
    rejects("FROM a\nRUN --device=nvidia.com/gpu=all x\n", "labs")


def test_run_without_command_is_rejected() -> None:
    rejects("FROM a\nRUN\n", "RUN requires at least one argument")


# --- RUN --mount -----------------------------------------------------------------------


def test_mount_cache_is_read_write_by_default() -> None:
    run = instruction("RUN --mount=type=cache,target=/root/.cache,id=pip,sharing=locked x\n")

    assert isinstance(run, RunCommand)
    assert run.mounts == (
        MountFlag(type="cache", target="/root/.cache", id="pip", sharing="locked", read_only=False),
    )
    assert run.mount_specs == ("type=cache,target=/root/.cache,id=pip,sharing=locked",)


def test_mount_error_in_run_names_the_line() -> None:
    rejects("FROM a\nRUN --mount=type=bind,mode=1 x\n", "mode not allowed", line=2)


def test_mount_values_with_variables_wait_for_expansion() -> None:
    run = instruction("RUN --mount=type=$T,target=/x,mode=$M x\n")

    assert isinstance(run, RunCommand)
    assert run.mounts[0].deferred is True
    assert run.mounts[0].type == "$T"
    values = {"$T": "cache", "$M": "700"}
    expanded = parse_mount(run.mount_specs[0], lambda word: values.get(word, word))

    assert expanded == MountFlag(type="cache", target="/x", mode=0o700, read_only=False)


# --- COPY and ADD ----------------------------------------------------------------------


def test_copy_splits_sources_dest_and_flags() -> None:
    copy = instruction("COPY --from=build --chown=app:app --chmod=755 --parents a b /dst/\n")

    assert isinstance(copy, CopyCommand)
    assert (copy.sources, copy.dest, copy.from_) == (("a", "b"), "/dst/", "build")
    assert (copy.chown, copy.chmod, copy.parents, copy.link) == ("app:app", "755", True, False)


def test_copy_json_form_allows_spaces_in_paths() -> None:
    copy = instruction('COPY ["a b", "/c d/"]\n')

    assert isinstance(copy, CopyCommand)
    assert (copy.sources, copy.dest) == (("a b",), "/c d/")


def test_copy_heredoc_sources_carry_their_content() -> None:
    copy = instruction("COPY <<one <<-'two' /dst/\nfirst $X\none\n\tsecond\ntwo\n")

    assert isinstance(copy, CopyCommand)
    assert copy.sources == ()
    assert copy.heredoc_sources == (
        HeredocSource(path="one", data="first $X\n", expand=True),
        HeredocSource(path="two", data="second\n", expand=False),
    )


def test_copy_needs_a_destination_that_is_not_a_heredoc() -> None:
    rejects("FROM a\nCOPY onlyone\n", "COPY requires at least two arguments")
    rejects("FROM a\nCOPY a <<EOF\nx\nEOF\n", "cannot accept a heredoc as a destination")


def test_add_flags() -> None:
    add = instruction(
        "ADD --checksum=sha256:abc --keep-git-dir --unpack=false --link https://x/a.tar /a\n"
    )

    assert isinstance(add, AddCommand)
    assert (add.checksum, add.keep_git_dir, add.unpack, add.link) == (
        "sha256:abc",
        True,
        False,
        True,
    )


def test_add_optional_booleans_are_none_when_not_given() -> None:
    add = instruction("ADD a.tar /a\n")

    assert isinstance(add, AddCommand)
    assert (add.keep_git_dir, add.unpack) == (None, None)


# --- ENV, LABEL, ARG -------------------------------------------------------------------


def test_env_pairs_keep_order_and_raw_words() -> None:
    env = instruction('ENV A=1 B="two words" C=$A\n')

    assert isinstance(env, EnvCommand)
    assert env.env == (("A", "1"), ("B", '"two words"'), ("C", "$A"))
    assert env.legacy is False


def test_legacy_env_and_label_forms_are_flagged() -> None:
    env = instruction("ENV PATH /usr/bin:$PATH\n")
    label = instruction("LABEL maintainer someone <a@b>\n")

    assert isinstance(env, EnvCommand) and env.legacy
    assert env.env == (("PATH", "/usr/bin:$PATH"),)
    assert isinstance(label, LabelCommand) and label.legacy
    assert label.labels == (("maintainer", "someone <a@b>"),)


def test_env_and_arg_reject_blank_names() -> None:
    rejects("FROM a\nENV =x\n", "ENV names can not be blank")
    rejects("FROM a\nARG =x\n", "ARG names can not be blank")
    rejects("FROM a\nENV\n", "ENV requires at least one argument")


def test_arg_defaults_are_none_when_absent() -> None:
    arg = instruction("FROM a\n# VERSION the version to build\nARG VERSION=1.0 EMPTY= NONE\n")

    assert isinstance(arg, ArgCommand)
    assert arg.args == (("VERSION", "1.0"), ("EMPTY", ""), ("NONE", None))
    assert arg.comments == ("the version to build", "", "")


# --- CMD, ENTRYPOINT, SHELL ------------------------------------------------------------


def test_cmd_and_entrypoint_forms() -> None:
    cmd = instruction("CMD echo hi\n")
    entrypoint = instruction('ENTRYPOINT ["/bin/app", "--flag"]\n')
    cleared = instruction("ENTRYPOINT []\n")

    assert isinstance(cmd, CmdCommand)
    assert (cmd.cmd_line, cmd.prepend_shell) == (("echo hi",), True)
    assert isinstance(entrypoint, EntrypointCommand)
    assert (entrypoint.cmd_line, entrypoint.prepend_shell) == (("/bin/app", "--flag"), False)
    assert isinstance(cleared, EntrypointCommand)
    assert (cleared.cmd_line, cleared.prepend_shell) == ((), False)


def test_shell_must_be_json() -> None:
    shell = instruction('SHELL ["/bin/bash", "-eo", "pipefail", "-c"]\n')

    assert isinstance(shell, ShellCommand)
    assert shell.shell == ("/bin/bash", "-eo", "pipefail", "-c")
    rejects("FROM a\nSHELL /bin/bash -c\n", "SHELL requires the arguments to be in JSON form")
    rejects("FROM a\nSHELL []\n", "SHELL requires at least one argument")


# --- HEALTHCHECK -----------------------------------------------------------------------


def test_healthcheck_shell_form_becomes_cmd_shell_with_durations_in_ns() -> None:
    check = instruction(
        "HEALTHCHECK --interval=30s --timeout=1m30s --start-period=1.5s "
        "--start-interval=100ms --retries=3 CMD curl -f http://localhost/\n"
    )

    assert isinstance(check, HealthcheckCommand)
    assert check.test == ("CMD-SHELL", "curl -f http://localhost/")
    assert (check.interval, check.timeout) == (30_000_000_000, 90_000_000_000)
    assert (check.start_period, check.start_interval) == (1_500_000_000, 100_000_000)
    assert check.retries == 3


def test_healthcheck_exec_form_and_none() -> None:
    exec_form = instruction('HEALTHCHECK CMD ["/bin/check", "-q"]\n')
    none = instruction("HEALTHCHECK none\n")

    assert isinstance(exec_form, HealthcheckCommand)
    assert exec_form.test == ("CMD", "/bin/check", "-q")
    assert isinstance(none, HealthcheckCommand)
    assert none.test == ("NONE",)


def test_healthcheck_zero_duration_means_inherit() -> None:
    check = instruction("HEALTHCHECK --interval=0s --timeout=0 CMD x\n")

    assert isinstance(check, HealthcheckCommand)
    assert (check.interval, check.timeout) == (0, 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("HEALTHCHECK --interval=500us CMD x", "cannot be less than 1ms"),
        ("HEALTHCHECK --interval=-1s CMD x", "cannot be less than 1ms"),
        ("HEALTHCHECK --timeout=5 CMD x", "missing unit in duration"),
        ("HEALTHCHECK --timeout=5d CMD x", "unknown unit"),
        ("HEALTHCHECK --retries=-1 CMD x", "--retries cannot be negative"),
        ("HEALTHCHECK --retries=x CMD x", "not a 32-bit integer"),
        ("HEALTHCHECK CONNECT TCP 7000", "Unknown type 'CONNECT' in HEALTHCHECK"),
        ("HEALTHCHECK CMD", "Missing command after HEALTHCHECK CMD"),
        ("HEALTHCHECK NONE x", "HEALTHCHECK NONE takes no arguments"),
        ("HEALTHCHECK", "HEALTHCHECK requires at least one argument"),
        ("HEALTHCHECK --inteval=1s CMD x", r"did you mean interval\?"),
    ],
)
def test_healthcheck_errors(text: str, message: str) -> None:
    rejects(f"FROM a\n{text}\n", message, line=2)


# --- ONBUILD ---------------------------------------------------------------------------


def test_onbuild_keeps_the_trigger_text_with_heredoc_bodies() -> None:
    onbuild = instruction("onbuild RUN <<EOF\necho hi\nEOF\n")

    assert isinstance(onbuild, OnbuildCommand)
    assert onbuild.expression == "RUN <<EOF\necho hi\nEOF"
    assert onbuild.trigger == "RUN"


def test_onbuild_refuses_onbuild_from_and_maintainer_triggers() -> None:
    rejects("FROM a\nONBUILD ONBUILD RUN x\n", "Chaining ONBUILD")
    rejects("FROM a\nONBUILD FROM b\n", "FROM isn't allowed as an ONBUILD trigger")
    rejects("FROM a\nONBUILD MAINTAINER me\n", "MAINTAINER isn't allowed")
    rejects("FROM a\nONBUILD\n", "ONBUILD requires at least one argument")


# --- single-argument and list instructions ---------------------------------------------


def test_single_argument_instructions() -> None:
    workdir = instruction("WORKDIR /app dir\n")
    user = instruction("USER app:app\n")
    signal = instruction("STOPSIGNAL SIGTERM\n")
    maintainer = instruction("MAINTAINER Jane <j@x>\n")

    assert isinstance(workdir, WorkdirCommand) and workdir.path == "/app dir"
    assert isinstance(user, UserCommand) and user.user == "app:app"
    assert isinstance(signal, StopSignalCommand) and signal.signal == "SIGTERM"
    assert isinstance(maintainer, MaintainerCommand) and maintainer.maintainer == "Jane <j@x>"
    rejects("FROM a\nWORKDIR\n", "WORKDIR requires exactly one argument")


def test_expose_and_volume() -> None:
    expose = instruction("EXPOSE 80 53/udp $PORT\n")
    volume = instruction('VOLUME ["/data", "/logs"]\n')

    assert isinstance(expose, ExposeCommand) and expose.ports == ("80", "53/udp", "$PORT")
    assert isinstance(volume, VolumeCommand) and volume.volumes == ("/data", "/logs")
    rejects('FROM a\nVOLUME [" "]\n', "VOLUME specified can not be an empty string")
    rejects("FROM a\nEXPOSE\n", "EXPOSE requires at least one argument")


def test_every_instruction_carries_its_location_and_original_text() -> None:
    run = parse_stages(parse("FROM a\nRUN a \\\n  b\n"))[0][0].commands[0]

    assert run.location.start_line == 2
    assert run.location.end_line == 3
    assert run.original == "RUN a   b"
