"""The command line's grammar through the real command: help, usage errors, where flags go."""

from __future__ import annotations

import io
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
