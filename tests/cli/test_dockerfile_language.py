"""The Dockerfile language end to end, through the real `dockbuild` command: the image
config and history in the output, ONBUILD across builds, stage selection, heredocs,
errors with their Dockerfile line, `-f -`, `--check` and `debug parse`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from clitools import DockbuildCLI, write_context
from conformance_data import BUILDKIT_DATA, conformance


def oci_image(path: Path) -> tuple[dict[str, Any], list[tarfile.TarFile]]:
    """(config, layer tars) of the single image in an OCI layout tar."""
    outer = tarfile.open(path)  # noqa: SIM115 - the layers are read after this returns

    def blob(digest: str) -> bytes:
        member = outer.extractfile("blobs/sha256/" + digest.split(":")[1])
        assert member is not None
        return member.read()

    index = json.loads(outer.extractfile("index.json").read())  # type: ignore[union-attr]
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    layers = [
        tarfile.open(fileobj=io.BytesIO(blob(d["digest"])))  # noqa: SIM115
        for d in manifest["layers"]
    ]
    return config, layers


def file_in(layers: list[tarfile.TarFile], name: str) -> bytes | None:
    """The content of `name` in the topmost layer that has it."""
    for layer in reversed(layers):
        try:
            member = layer.extractfile(name)
        except KeyError:
            continue
        if member is not None:
            return member.read()
    return None


def build_oci(dockbuild: DockbuildCLI, context: Path, *args: str, **kw: Any):  # type: ignore[no-untyped-def]
    out = context.parent / (context.name + ".oci.tar")
    run = dockbuild.build(context, "-o", f"type=oci,dest={out}", *args, **kw)
    return run, out


def test_config_and_history_are_written_as_buildkit_writes_them(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "meta",
        {
            "Dockerfile": (
                "FROM busybox\n"
                "ARG VERSION=1.0\n"
                "ENV APP_HOME=/srv/app\n"
                "WORKDIR $APP_HOME\n"
                "LABEL version=$VERSION\n"
                "EXPOSE 8080/tcp 53/udp\n"
                "VOLUME /data\n"
                "USER 1000:1000\n"
                "STOPSIGNAL SIGINT\n"
                "HEALTHCHECK --interval=30s CMD wget -q localhost\n"
                'ENTRYPOINT ["/bin/sh", "-c"]\n'
                'CMD ["echo hi"]\n'
            )
        },
    )
    _, out = build_oci(dockbuild, ctx, "--label", "extra=cli")
    config, layers = oci_image(out)
    c = config["config"]
    assert c["WorkingDir"] == "/srv/app"
    assert c["Labels"] == {"version": "1.0", "extra": "cli"}
    assert c["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert c["Volumes"] == {"/data": {}}
    assert c["User"] == "1000:1000"
    assert c["StopSignal"] == "SIGINT"
    assert c["Healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q localhost"],
        "Interval": 30_000_000_000,
    }
    assert c["Entrypoint"] == ["/bin/sh", "-c"] and c["Cmd"] == ["echo hi"]
    assert "APP_HOME=/srv/app" in c["Env"]
    ours = [h for h in config["history"] if h.get("comment") == "buildkit.dockerfile.v0"]
    assert [(h["created_by"], h.get("empty_layer", False)) for h in ours] == [
        ("ARG VERSION=1.0", True),
        ("ENV APP_HOME=/srv/app", True),
        ("WORKDIR /srv/app", False),
        ("LABEL version=1.0", True),
        ("EXPOSE [53/udp 8080/tcp]", True),  # BuildKit sorts the words
        ("VOLUME [/data]", True),
        ("USER 1000:1000", True),
        ("STOPSIGNAL SIGINT", True),
        (
            "HEALTHCHECK {Test:[CMD-SHELL wget -q localhost] Interval:30s Timeout:0s "
            "StartPeriod:0s StartInterval:0s Retries:0}",
            True,
        ),
        ('ENTRYPOINT ["/bin/sh" "-c"]', True),
        ('CMD ["echo hi"]', True),
    ]
    non_empty = [h for h in config["history"] if not h.get("empty_layer")]
    assert len(non_empty) == len(config["rootfs"]["diff_ids"]) == len(layers)
    # WORKDIR created the directory (the last layer holds it).
    assert "srv/app" in layers[-1].getnames()


def test_onbuild_triggers_run_in_a_child_build_of_the_image(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    parent = write_context(
        tmp_path / "parent",
        {
            "Dockerfile": "FROM busybox\nONBUILD COPY hello.txt /from-trigger.txt\nONBUILD RUN echo ran > /ran\n"
        },
    )
    layout = tmp_path / "parent-layout"
    dockbuild.build(parent, "-o", f"type=oci,dest={layout},tar=false", "-t", "parent:1")
    child = write_context(
        tmp_path / "child",
        {
            "Dockerfile": "FROM parent\nRUN cat /ran /from-trigger.txt > /both\n",
            "hello.txt": "hi\n",
        },
    )
    run, out = build_oci(dockbuild, child, "--build-context", f"parent=oci-layout://{layout}")
    config, layers = oci_image(out)
    assert file_in(layers, "both") == b"ran\nhi\n"
    assert not config["config"].get("OnBuild")  # triggers do not carry over
    assert "ONBUILD COPY hello.txt /from-trigger.txt" in run.stderr  # shown as triggered steps


def test_a_failing_run_in_a_stage_the_target_does_not_need_never_runs(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "stages",
        {
            "Dockerfile": (
                "FROM busybox AS broken\nRUN echo should-not-run && exit 3\n"
                "FROM busybox AS Good\nRUN echo good > /good\n"
                "FROM busybox\nCOPY --from=good /good /copied\nCOPY --from=1 /good /by-index\n"
            )
        },
    )
    run, out = build_oci(dockbuild, ctx)
    assert "should-not-run" not in run.stderr
    _, layers = oci_image(out)
    assert file_in(layers, "copied") == b"good\n" and file_in(layers, "by-index") == b"good\n"
    # --target picks a stage by its (case-insensitive) name.
    failed = dockbuild.build(
        ctx, "--target", "BROKEN", "-o", f"type=oci,dest={tmp_path}/x.tar", check=False
    )
    assert failed.returncode == 1 and "exit code: 3" in failed.stderr


def test_heredoc_shebang_script_runs_as_a_file(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "heredoc",
        {
            "Dockerfile": (
                "FROM busybox\n"
                'RUN <<EOF\n#!/bin/busybox sh\necho "as $0" > /shebang\nEOF\n'
                "RUN <<EOF\necho one > /plain\necho two >> /plain\nEOF\n"
                "RUN <<EOF cat > /catted\nread by cat\nEOF\n"
                "ARG WHO=world\n"
                "COPY <<EOT /expanded\nhello $WHO\nEOT\n"
                "COPY <<'EOT' /literal\nhello $WHO\nEOT\n"
            )
        },
    )
    _, out = build_oci(dockbuild, ctx)
    _, layers = oci_image(out)
    assert file_in(layers, "shebang") == b"as /dev/pipes/EOF\n"
    assert file_in(layers, "plain") == b"one\ntwo\n"
    assert file_in(layers, "catted") == b"read by cat\n"  # the heredoc is cat's stdin
    assert file_in(layers, "expanded") == b"hello world\n"
    assert file_in(layers, "literal") == b"hello $WHO\n"


def test_dockerfile_errors_name_the_line_show_it_and_exit_1(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "bad", {"Dockerfile": "FROM busybox\nRUN echo ok\nCOPPY a /a\n"})
    run = dockbuild.build(ctx, check=False)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert "Dockerfile:3" in run.stderr
    assert "   3 | >>> COPPY a /a" in run.stderr
    assert "ERROR: unknown instruction: COPPY (did you mean COPY?)" in run.stderr


def test_dockerfile_from_stdin(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "stdin", {"data.txt": "from the context\n"})
    _, out = build_oci(dockbuild, ctx, "-f", "-", input=b"FROM busybox\nCOPY data.txt /data.txt\n")
    _, layers = oci_image(out)
    assert file_in(layers, "data.txt") == b"from the context\n"
    bad = dockbuild.build(ctx, "-f", "-", input=b"FROM busybox\nBOGUS x\n", check=False)
    assert bad.returncode == 1
    assert "Dockerfile (stdin):2" in bad.stderr and ">>> BOGUS x" in bad.stderr


def test_check_reports_rules_with_lines_and_builds_nothing(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "lint",
        {"Dockerfile": "FROM busybox AS Build\nRUN exit 7\nCMD echo hi\n"},
    )
    run = dockbuild.build(ctx, "--check", check=False)
    assert run.returncode == 1
    assert "exit code: 7" not in run.stderr  # nothing ran
    out = run.out
    assert (
        "WARNING: StageNameCasing - https://docs.docker.com/go/dockerfile/rule/stage-name-casing/"
        in out
    )
    assert "Stage name 'Build' should be lowercase" in out
    assert "Dockerfile:3" in out and "   3 | >>> CMD echo hi" in out
    assert "Check complete, 2 warnings have been found!" in out
    (ctx / "Dockerfile").write_text(
        "# check=skip=StageNameCasing,JSONArgsRecommended\n" + (ctx / "Dockerfile").read_text()
    )
    clean = dockbuild.build(ctx, "--check")
    assert "Check complete, no warnings found." in clean.out


def test_warnings_are_printed_during_a_build_and_error_true_fails_it(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "warn", {"Dockerfile": "FROM busybox\nCMD echo hi\n"})
    run, _ = build_oci(dockbuild, ctx, "--build-arg", "NOT_USED=1")
    assert "JSONArgsRecommended: JSON arguments recommended for CMD" in run.stderr
    assert "(line 2)" in run.stderr
    assert "One or more build-args [NOT_USED] were not consumed" in run.stderr
    (ctx / "Dockerfile").write_text("# check=error=true\nFROM busybox\nCMD echo hi\n")
    failed = dockbuild.build(ctx, "-o", f"type=oci,dest={tmp_path}/y.tar", check=False)
    assert failed.returncode == 1
    assert "lint violation found for rules: JSONArgsRecommended" in failed.stderr


@conformance
@pytest.mark.parametrize("case", ["env", "flags", "continue-at-eof"])
def test_debug_parse_prints_buildkits_ast_dump(dockbuild: DockbuildCLI, case: str) -> None:
    folder = BUILDKIT_DATA / "parser-testfiles" / case
    run = dockbuild("debug", "parse", str(folder / "Dockerfile"))
    assert run.out == (folder / "result").read_text()


def test_run_history_lists_every_arg_in_scope_and_arg_after_env_wins_in_run(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    # BuildKit's runCommandString: `|N K=v ...` names each ARG of the stage (an unset one as
    # `K=`), showing the value RUN sees; the state env takes the latest ARG or ENV of a
    # name, so an ARG after an ENV of the same name wins in RUN (the image Env keeps the ENV).
    ctx = write_context(
        tmp_path / "args",
        {
            "Dockerfile": (
                "FROM busybox\n"
                "ARG UNSET\n"
                "ARG A=1\n"
                "ENV B=env\n"
                "ARG B=arg\n"
                "ENV A=env-a\n"
                'RUN echo "A=$A B=$B UNSET=${UNSET-none}" > /seen\n'
            )
        },
    )
    _, out = build_oci(dockbuild, ctx, "--build-arg", "HTTP_PROXY=http://proxy.invalid:3128")
    config, layers = oci_image(out)
    assert file_in(layers, "seen") == b"A=env-a B=arg UNSET=none\n"
    assert "B=env" in config["config"]["Env"] and "A=env-a" in config["config"]["Env"]
    runs = [h["created_by"] for h in config["history"] if h["created_by"].startswith("RUN")]
    assert runs == [
        'RUN |3 UNSET= A=env-a B=arg /bin/sh -c echo "A=$A B=$B UNSET=${UNSET-none}" > /seen '
        "# buildkit"
    ]  # the undeclared proxy build arg stays out of history


def test_sandbox_hostname_build_arg_sets_the_hostname_of_run(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "hostname",
        {"Dockerfile": "FROM busybox\nRUN hostname > /name && cat /etc/hosts > /hosts\n"},
    )
    _, out = build_oci(dockbuild, ctx, "--build-arg", "BUILDKIT_SANDBOX_HOSTNAME=builder-1")
    _, layers = oci_image(out)
    assert file_in(layers, "name") == b"builder-1\n"
    hosts = file_in(layers, "hosts")
    assert hosts is not None and b"builder-1" in hosts
    _, plain = build_oci(
        dockbuild,
        write_context(tmp_path / "default", {"Dockerfile": "FROM busybox\nRUN hostname > /name\n"}),
    )
    assert file_in(oci_image(plain)[1], "name") == b"buildkitsandbox\n"


def test_experimental_checks_run_when_enabled(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    dockerfile = (
        "# base has the tools\n"  # a description that follows the format
        "FROM busybox AS base\n"
        "# the version to install\n"
        "ARG VERSION=1\n"
        "COPY secret.txt kept.txt /\n"
    )
    ctx = write_context(
        tmp_path / "experimental",
        {
            "Dockerfile": dockerfile,
            ".dockerignore": "secret.txt\n",
            "secret.txt": "s\n",
            "kept.txt": "k\n",
        },
    )
    quiet = dockbuild.build(ctx, "--check")
    assert "Check complete, no warnings found." in quiet.out  # experimental: off by default
    (ctx / "Dockerfile").write_text("# check=experimental=all\n" + dockerfile)
    run = dockbuild.build(ctx, "--check", check=False)
    out = run.out
    assert run.returncode == 1
    assert "WARNING: InvalidDefinitionDescription" in out
    assert "Comment for ARG should follow the format: `# VERSION <description>`" in out
    assert "WARNING: CopyIgnoredFile" in out
    assert 'Attempting to Copy file "secret.txt" that is excluded by .dockerignore' in out
    assert 'file "kept.txt"' not in out
    assert "Check complete, 2 warnings have been found!" in out
    (ctx / "Dockerfile").write_text(
        "# check=experimental=CopyIgnoredFile\n" + dockerfile.replace("the version", "VERSION")
    )
    named = dockbuild.build(ctx, "--check", check=False)
    assert "CopyIgnoredFile" in named.out and "InvalidDefinitionDescription" not in named.out
