"""The command line: docker build / buildx flag names in, a BuildRequest out.

``dockbuild PATH`` means ``dockbuild build PATH``. The CLI holds no build logic; it turns
flags into a :class:`dockbuild.build.BuildRequest`, calls ``build()``, and prints
DockbuildErrors without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from dockbuild import __version__

SUBCOMMANDS = {"build", "debug", "version", "--help", "-h"}

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Build container images from Dockerfiles, without a daemon.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
debug_app = typer.Typer(help="Look inside a build: the parsed Dockerfile, the LLB graph.")
app.add_typer(debug_app, name="debug")

_DEBUG = False


def _kv(values: list[str], what: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not key:
            raise typer.BadParameter(f"invalid {what} {item!r}: expected KEY=VALUE")
        out[key] = value if sep else None
    return out


@app.command("build")
def build_cmd(
    context: Annotated[str, typer.Argument(help="Build context: a directory, or - for a tar on stdin.")],
    file: Annotated[str | None, typer.Option("-f", "--file", help="Name of the Dockerfile (default: PATH/Dockerfile).")] = None,
    tag: Annotated[list[str], typer.Option("-t", "--tag", help="Name and optionally a tag (name:tag).")] = [],  # noqa: B006
    target: Annotated[str | None, typer.Option("--target", help="Target build stage.")] = None,
    build_arg: Annotated[list[str], typer.Option("--build-arg", help="Set build-time variables (KEY=VALUE, or KEY to take it from the environment).")] = [],  # noqa: B006
    build_context: Annotated[list[str], typer.Option("--build-context", help="Additional build contexts (NAME=DIR|docker-image://REF|oci-layout://PATH[:TAG]).")] = [],  # noqa: B006
    output: Annotated[list[str], typer.Option("-o", "--output", help="Output destination (type=docker|oci|local|tar[,dest=PATH]; PATH for local; - for a tar on stdout).")] = [],  # noqa: B006
    label: Annotated[list[str], typer.Option("--label", help="Set metadata for an image (KEY=VALUE).")] = [],  # noqa: B006
    progress: Annotated[str, typer.Option("--progress", help="auto, plain, tty, rawjson or quiet.")] = "auto",
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Suppress the build output and print the image ID on success.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not use the cache when building.")] = False,
    pull: Annotated[bool, typer.Option("--pull", help="Always resolve base image tags again.")] = False,
    platform: Annotated[str | None, typer.Option("--platform", help="Target platform (only the host's, linux/amd64, for now).")] = None,
    executor: Annotated[str | None, typer.Option("--executor", help="How RUN steps run: namespace (default), chroot.")] = None,
    network: Annotated[str, typer.Option("--network", help="Default network mode for RUN: default, none or host.")] = "default",
    iidfile: Annotated[str | None, typer.Option("--iidfile", help="Write the image ID to this file.")] = None,
    metadata_file: Annotated[str | None, typer.Option("--metadata-file", help="Write build result metadata to this file.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """Build an image from a Dockerfile."""
    global _DEBUG
    _DEBUG = _DEBUG or debug
    from dockbuild.build import BuildRequest, build

    request = BuildRequest(
        context=context,
        dockerfile=file,
        tags=list(tag),
        target=target,
        build_args=_kv(build_arg, "build-arg"),
        build_contexts={k: v or "" for k, v in _kv(build_context, "build-context").items()},
        outputs=list(output),
        labels={k: v or "" for k, v in _kv(label, "label").items()},
        progress="quiet" if quiet else progress,
        quiet=quiet,
        no_cache=no_cache,
        pull=pull,
        platform=platform,
        executor=executor,
        network=network,
        iidfile=iidfile,
        metadata_file=metadata_file,
    )
    build(request)


@debug_app.command("parse")
def debug_parse(
    file: Annotated[str, typer.Argument(help="The Dockerfile to parse (- for stdin).")],
) -> None:
    """Print the parsed Dockerfile in BuildKit's AST dump format."""
    from dockbuild.frontend import parser

    data = sys.stdin.buffer.read() if file == "-" else _read(file)
    sys.stdout.write(parser.dump(parser.parse(data, filename=file)))


@debug_app.command("llb")
def debug_llb(
    context: Annotated[str, typer.Argument(help="Build context directory.")],
    file: Annotated[str | None, typer.Option("-f", "--file")] = None,
    target: Annotated[str | None, typer.Option("--target")] = None,
    build_arg: Annotated[list[str], typer.Option("--build-arg")] = [],  # noqa: B006
    build_context: Annotated[list[str], typer.Option("--build-context")] = [],  # noqa: B006
) -> None:
    """Print the LLB graph of a build as JSON (op digests are stable)."""
    import json

    from dockbuild.build import BuildRequest, definition

    request = BuildRequest(
        context=context,
        dockerfile=file,
        target=target,
        build_args=_kv(build_arg, "build-arg"),
        build_contexts={k: v or "" for k, v in _kv(build_context, "build-context").items()},
        progress="quiet",
    )
    print(json.dumps(definition(request), indent=2))


@debug_app.command("info")
def debug_info() -> None:
    """Show how RUN steps would be executed here, and where the cache lives."""
    import json

    from dockbuild.engine.executor import describe
    from dockbuild.engine.store import default_root

    print(json.dumps({"cache_root": str(default_root()), "executor": describe()}, indent=2))


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    print(f"dockbuild {__version__}")


def _read(path: str) -> bytes:
    from dockbuild.errors import DockbuildError

    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DockbuildError(f"cannot read {path}: {e.strerror}") from e


def _print_error(err: Exception) -> None:
    from dockbuild.errors import DockbuildError, ExecError

    assert isinstance(err, DockbuildError)
    lines: list[str] = []
    if isinstance(err, ExecError) and err.log_tail:
        lines.append("------")
        lines += [f" > {line}" for line in err.log_tail[-10:]]
        lines.append("------")
    loc = err.location
    if loc is not None:
        lines.append(f"{loc.filename}:{loc.start_line}")
        snippet = getattr(err, "snippet", None)
        if snippet:
            lines.append("--------------------")
            lines += snippet
            lines.append("--------------------")
    lines.append(f"ERROR: {err.message}")
    if err.hint:
        lines.append(f"hint: {err.hint}")
    print("\n".join(lines), file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    global _DEBUG
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["--version"], ["-v"]):
        print(f"dockbuild {__version__}")
        return
    _DEBUG = "--debug" in args or os.environ.get("DOCKBUILD_DEBUG") == "1"
    if args and args[0] not in SUBCOMMANDS:
        args.insert(0, "build")
    from dockbuild.errors import DockbuildError

    try:
        app(args=args, prog_name="dockbuild", standalone_mode=False)
    except DockbuildError as e:
        if _DEBUG:
            raise
        _print_error(e)
        sys.exit(1)
    except BrokenPipeError:
        # The reader of stdout went away (`dockbuild . | head -c 10`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        print("ERROR: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise
