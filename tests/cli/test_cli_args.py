"""The command line's grammar through the real command: help, usage errors, where flags go."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from clitools import DockbuildCLI, read_oci, write_context

GREETING = 'FROM busybox\nARG GREETING\nRUN echo "$GREETING" > /greeting\n'


def _usage_error(run_stderr: str, returncode: int) -> None:
    assert returncode == 2, run_stderr
    assert "usage: dockbuild" in run_stderr
    assert "ERROR: " in run_stderr
    assert "Traceback" not in run_stderr


def test_build_help_lists_the_build_flags(dockbuild: DockbuildCLI) -> None:
    run = dockbuild("build", "--help")
    for flag in ("-f FILE, --file", "-t NAME, --tag", "--build-arg", "--build-context",
                 "-o SPEC, --output", "--progress", "-q, --quiet", "--no-cache", "--push", "--debug"):
        assert flag in run.out
    assert "Name and optionally a tag (name:tag)." in run.out
    assert run.stderr == ""


def test_top_level_help_lists_the_commands(dockbuild: DockbuildCLI) -> None:
    for flag in ("--help", "-h"):
        out = dockbuild(flag).out
        for command in ("build", "debug", "du", "prune", "version"):
            assert f"\n    {command} " in out


def test_no_arguments_print_the_help_and_fail(dockbuild: DockbuildCLI) -> None:
    run = dockbuild(check=False)
    assert run.returncode == 2
    assert run.out.startswith("usage: dockbuild")
    assert "Build an image from a Dockerfile." in run.out


def test_debug_help_lists_its_commands_and_each_has_help(dockbuild: DockbuildCLI) -> None:
    out = dockbuild("debug", "--help").out
    for command in ("parse", "llb", "info", "check-cache"):
        assert f"\n    {command}" in out
    assert "--build-arg" in dockbuild("debug", "llb", "-h").out
    assert "--repair" in dockbuild("debug", "check-cache", "--help").out


def test_debug_without_a_command_is_a_usage_error(dockbuild: DockbuildCLI) -> None:
    run = dockbuild("debug", check=False)
    _usage_error(run.stderr, run.returncode)


def test_unknown_option_is_a_usage_error_that_names_it(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    for args in (["--bogus", str(tmp_path)], [str(tmp_path), "--bogus"], ["build", "--bogus=1", str(tmp_path)]):
        run = dockbuild(*args, check=False)
        _usage_error(run.stderr, run.returncode)
        assert "--bogus" in run.stderr
    run = dockbuild("prune", "-x", check=False)
    _usage_error(run.stderr, run.returncode)
    assert "-x" in run.stderr


def test_a_prefix_of_an_option_does_not_stand_for_it(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    run = dockbuild("--build-ar", "X=1", str(tmp_path), check=False)
    _usage_error(run.stderr, run.returncode)
    assert "--build-ar" in run.stderr


def test_missing_path_or_option_value_is_a_usage_error(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    run = dockbuild("build", "-q", check=False)
    _usage_error(run.stderr, run.returncode)
    assert "PATH" in run.stderr
    run = dockbuild(str(tmp_path), "-t", check=False)
    _usage_error(run.stderr, run.returncode)
    assert "-t/--tag" in run.stderr
    run = dockbuild("version", "extra", check=False)
    _usage_error(run.stderr, run.returncode)
    assert "extra" in run.stderr


def test_bad_key_value_is_a_usage_error_that_names_the_value(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    for flag in ("--build-arg", "--label", "--build-context"):
        run = dockbuild(flag, "=oops", str(tmp_path), check=False)
        _usage_error(run.stderr, run.returncode)
        assert "'=oops'" in run.stderr


def test_options_after_path_apply(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": GREETING})
    dest = tmp_path / "image.tar"
    dockbuild(str(ctx), *dockbuild.base_context, "--progress=plain", "-t", "late:1", "-o", f"type=oci,dest={dest}")
    image = read_oci(dest)
    assert image.manifest["layers"]


def test_output_dash_writes_a_tar_to_stdout(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": GREETING})
    run = dockbuild.build(ctx, "--build-arg", "GREETING=hello", "-o", "-")
    with tarfile.open(fileobj=io.BytesIO(run.stdout)) as tf:
        assert tf.extractfile("greeting").read() == b"hello\n"  # type: ignore[union-attr]


def test_build_arg_equals_form_keeps_the_rest_of_the_value(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": GREETING})
    dockbuild.build(ctx, "--build-arg=GREETING=a=b", "-o", f"type=local,dest={tmp_path / 'out'}")
    assert (tmp_path / "out" / "greeting").read_text() == "a=b\n"


def test_importing_the_cli_loads_no_heavy_dependency() -> None:
    """Start-up is part of every command: the parser must not pull in a framework."""
    code = (
        "import sys, dockbuild.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('typer', 'click', 'rich', 'requests', 'pydantic')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bad_flag_values_are_usage_errors_before_anything_runs(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": GREETING})
    for args, named in [
        (["--network", "hots"], "'hots'"),
        (["--executor", "runcc"], "'runcc'"),
        (["--build-context", "extra"], "'extra'"),
        (["--add-host", "db:not-an-ip"], "'not-an-ip'"),
        (["--add-host", "justahost"], "'justahost'"),
        (["--shm-size", "lots"], "'lots'"),
        (["--pull=maybe"], "'maybe'"),
    ]:
        run = dockbuild.build(ctx, *args, check=False)
        _usage_error(run.stderr, run.returncode)
        assert named in run.stderr
        assert "#1 " not in run.stderr  # refused before the build started


def test_an_unknown_executor_is_refused_when_every_step_is_cached(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": GREETING})
    dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'out'}")
    run = dockbuild.build(ctx, "--executor", "runcc", "-o", f"type=local,dest={tmp_path / 'out'}", check=False)
    _usage_error(run.stderr, run.returncode)


def test_malformed_output_and_cache_specs_exit_2_before_any_step(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": GREETING})
    for args, message in [
        (["-o", "type=oci,dest=x,colour=blue"], "has no option 'colour'"),
        (["-o", "type=floppy"], "unknown type 'floppy'"),
        (["-o", "type=oci,dest"], "is not KEY=VALUE"),
        (["--cache-to", "type=gha"], "cache type 'gha' is not supported"),
        (["--cache-from", "type=local"], "needs src=DIRECTORY"),
        (["--cache-to", "type=local,dest=d,mode=most"], "mode must be min or max"),
        (["-t", "Bad:Name"], "repository names must be lowercase"),  # also for the default tarball
        (["-t", ""], "an empty name"),
    ]:
        run = dockbuild.build(ctx, *args, check=False)
        assert run.returncode == 2, (args, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr
        assert "#1 " not in run.stderr


def test_docker_flags_dockbuild_lacks_are_refused_by_name(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    for args, name in [
        (["--provenance=false"], "--provenance"),
        (["--provenance", "mode=max"], "--provenance"),
        (["--sbom=true"], "--sbom"),
        (["--annotation", "a=b"], "--annotation"),
        (["--attest", "type=sbom"], "--attest"),
        (["--builder=remote"], "--builder"),
        (["--ulimit", "nofile=1024"], "--ulimit"),
        (["--call=outline"], "--call=outline"),
    ]:
        run = dockbuild(*args, str(tmp_path), check=False)
        _usage_error(run.stderr, run.returncode)
        assert f"dockbuild does not support `{name}` yet" in run.stderr
        assert "no such option" not in run.stderr


def test_harmless_docker_flags_are_accepted_and_explained_only_with_debug(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": GREETING})
    drop_in = ["--rm", "--force-rm=true", "--compress", "--pull=false", "--quiet=false", "--no-cache=false",
               "--disable-content-trust=true", "--call=build"]  # fmt: skip
    run = dockbuild.build(ctx, *drop_in, "-o", f"type=local,dest={tmp_path / 'a'}")
    assert "ignores" not in run.stderr
    assert (tmp_path / "a" / "greeting").exists()
    run = dockbuild.build(ctx, *drop_in, "--debug", "-o", f"type=local,dest={tmp_path / 'b'}")
    assert "dockbuild ignores `--rm`: there is no intermediate container" in run.stderr
    assert "dockbuild ignores `--compress`" in run.stderr
    assert re.search(r"\] RUN [^\n]*\n#\d+ CACHED", run.stderr), run.stderr  # --no-cache=false


def test_a_switch_set_to_true_is_the_switch(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": GREETING})
    dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'a'}")
    run = dockbuild.build(ctx, "--no-cache=true", "-o", f"type=local,dest={tmp_path / 'b'}")
    assert re.search(r"\] RUN [^\n]*\n#\d+ DONE", run.stderr), run.stderr  # ran again
    quiet = dockbuild.build(ctx, "--quiet=1", "-o", f"type=oci,dest={tmp_path / 'c.tar'}")
    assert quiet.out.startswith("sha256:") and "#1 " not in quiet.stderr


def test_call_check_is_the_check_flag(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "from busybox as Build\n"})
    for flag in ("--check", "--call=check"):
        run = dockbuild.build(ctx, flag, check=False)
        assert run.returncode == 1 and "StageNameCasing" in run.out, run.out


def test_the_flag_name_lists_match_what_the_engine_and_frontend_accept() -> None:
    from dockbuild.cli import EXECUTORS, NETWORK_MODES
    from dockbuild.engine.executor.choice import NAMES
    from dockbuild.llb import NETWORK_MODES as GRAPH_NETWORK_MODES

    assert set(EXECUTORS) == {"auto", *NAMES}
    assert NETWORK_MODES == GRAPH_NETWORK_MODES


def test_secret_without_id_takes_the_file_name(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM busybox\nRUN --mount=type=secret,id=token.txt cp /run/secrets/token.txt /seen\n",
    })  # fmt: skip
    (tmp_path / "token.txt").write_text("s3cret")
    dockbuild.build(ctx, "--secret", f"src={tmp_path / 'token.txt'}", "-o", f"type=local,dest={tmp_path / 'out'}")
    assert (tmp_path / "out" / "seen").read_text() == "s3cret"


def test_add_host_and_shm_size_are_accepted(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": GREETING})
    dockbuild.build(ctx, "--add-host", "db:10.0.0.2", "--add-host=cache=::1", "--add-host", "v6:[fe80::1]",
                    "--shm-size", "64m", "--shm-size=1GiB", "-o", f"type=local,dest={tmp_path / 'out'}")  # fmt: skip
    assert (tmp_path / "out" / "greeting").exists()
