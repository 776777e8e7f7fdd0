"""The command line: docker build / buildx flag names in, a BuildRequest out.

``dockbuild PATH`` means ``dockbuild build PATH``. The CLI holds no build logic; it turns
flags into a :class:`dockbuild.build.BuildRequest`, calls ``build()``, and prints
DockbuildErrors without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import typer

from dockbuild import __version__

SUBCOMMANDS = {"build", "debug", "version", "du", "prune", "--help", "-h"}

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
    context: Annotated[str, typer.Argument(help="Build context: a directory, a git URL, an HTTP(S) tarball, or - for a tar (or a Dockerfile) on stdin.")],
    file: Annotated[str | None, typer.Option("-f", "--file", help="Name of the Dockerfile (default: PATH/Dockerfile).")] = None,
    tag: Annotated[list[str], typer.Option("-t", "--tag", help="Name and optionally a tag (name:tag).")] = [],  # noqa: B006
    target: Annotated[str | None, typer.Option("--target", help="Target build stage.")] = None,
    build_arg: Annotated[list[str], typer.Option("--build-arg", help="Set build-time variables (KEY=VALUE, or KEY to take it from the environment).")] = [],  # noqa: B006
    build_context: Annotated[list[str], typer.Option("--build-context", help="Additional build contexts (NAME=DIR|docker-image://REF|oci-layout://PATH[:TAG]|GIT-URL|HTTP-TAR-URL).")] = [],  # noqa: B006
    output: Annotated[list[str], typer.Option("-o", "--output", help="Output destination (type=docker|oci|image|registry|local|tar[,dest=PATH][,KEY=VALUE...]; PATH for local; - for a tar on stdout). See docs/outputs.md.")] = [],  # noqa: B006
    label: Annotated[list[str], typer.Option("--label", help="Set metadata for an image (KEY=VALUE).")] = [],  # noqa: B006
    progress: Annotated[str, typer.Option("--progress", help="auto, plain, tty, rawjson or quiet.")] = "auto",
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Suppress the build output and print the image ID on success.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not use the cache when building.")] = False,
    pull: Annotated[bool, typer.Option("--pull", help="Always resolve base image tags again.")] = False,
    no_cache_filter: Annotated[list[str], typer.Option("--no-cache-filter", help="Do not use the cache for these stages (comma-separated names).")] = [],  # noqa: B006
    explain_cache: Annotated[bool, typer.Option("--explain-cache", help="Say, for every step that misses the cache, which input changed.")] = False,
    cache_from: Annotated[list[str], typer.Option("--cache-from", help="Import build cache (type=local,src=DIR | type=registry,ref=REF | REF).")] = [],  # noqa: B006
    cache_to: Annotated[list[str], typer.Option("--cache-to", help="Export build cache (type=local,dest=DIR | type=registry,ref=REF[,mode=min|max]).")] = [],  # noqa: B006
    platform: Annotated[str | None, typer.Option("--platform", help="Target platform (only the host's, linux/amd64, for now).")] = None,
    executor: Annotated[str | None, typer.Option("--executor", help="How RUN steps run: namespace (default), runc, chroot.")] = None,
    network: Annotated[str, typer.Option("--network", help="Default network mode for RUN: default, none or host.")] = "default",
    secret: Annotated[list[str], typer.Option("--secret", help="Secret for RUN --mount=type=secret (id=ID[,src=FILE|,env=VAR]).")] = [],  # noqa: B006
    ssh: Annotated[list[str], typer.Option("--ssh", help="SSH agent or keys for RUN --mount=type=ssh (default|ID[=SOCKET|KEY,...]).")] = [],  # noqa: B006
    allow: Annotated[list[str], typer.Option("--allow", help="Allow an entitlement: network.host, security.insecure.")] = [],  # noqa: B006
    iidfile: Annotated[str | None, typer.Option("--iidfile", help="Write the image ID to this file.")] = None,
    metadata_file: Annotated[str | None, typer.Option("--metadata-file", help="Write build result metadata to this file.")] = None,
    push: Annotated[bool, typer.Option("--push", help="Shorthand for --output=type=registry (push the -t names).")] = False,
    load: Annotated[bool, typer.Option("--load", help="Shorthand for --output=type=docker loaded into the local docker (docker load).")] = False,
    squash: Annotated[bool, typer.Option("--squash", help="Merge the layers the build adds on top of its base image into one.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Only run the build checks (lint rules) and report their warnings; build nothing.")] = False,
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
        no_cache_filter=[n for value in no_cache_filter for n in value.split(",") if n],
        explain_cache=explain_cache,
        cache_from=list(cache_from),
        cache_to=list(cache_to),
        platform=platform,
        executor=executor,
        network=network,
        secrets=list(secret),
        ssh=list(ssh),
        allow=[a for value in allow for a in value.split(",") if a],
        iidfile=iidfile,
        metadata_file=metadata_file,
        push=push,
        load=load,
        squash=squash,
        check=check,
    )
    if check:
        _run_checks(request)
        return
    build(request)


def _run_checks(request: object) -> None:
    """`--check`: print each warning with its rule, URL and Dockerfile lines; exit 1 if any."""
    from dockbuild.build import check, snippet

    warnings = check(request)  # type: ignore[arg-type]
    out: list[str] = []
    for w in warnings:
        out.append(f"WARNING: {w.rule} - {w.url}" if w.url else f"WARNING: {w.rule}")
        out.append(w.message)
        if w.location is not None:
            out.append(f"{w.location.filename}:{w.location.start_line}")
            lines = snippet(w.location)
            if lines:
                out += ["--------------------", *lines, "--------------------"]
        out.append("")
    if warnings:
        plural = "warning has" if len(warnings) == 1 else "warnings have"
        out.append(f"Check complete, {len(warnings)} {plural} been found!")
    else:
        out.append("Check complete, no warnings found.")
    print("\n".join(out))
    if warnings:
        sys.exit(1)


@debug_app.command("parse")
def debug_parse(
    file: Annotated[str, typer.Argument(help="The Dockerfile to parse (- for stdin).")],
) -> None:
    """Print the parsed Dockerfile in BuildKit's AST dump format."""
    from dockbuild.frontend import parser

    data = sys.stdin.buffer.read() if file == "-" else _read(file)
    sys.stdout.write(parser.dump(parser.parse(data, filename=file)) + "\n")


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


@app.command("du")
def du_cmd(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="One block of details per record.")] = False,
    filter_: Annotated[list[str], typer.Option("--filter", help="type==regular|exec.cachemount|..., id=PREFIX, description~=REGEX, until=DURATION.")] = [],  # noqa: B006
) -> None:
    """Show what the build cache holds, in bytes on disk (database included)."""
    from dockbuild.engine import gc
    from dockbuild.engine.store import Store

    store = Store()
    try:
        print(gc.render_du(gc.disk_usage(store, filter_), verbose))
    finally:
        store.close()


@app.command("prune")
def prune_cmd(
    all_: Annotated[bool, typer.Option("-a", "--all", help="Remove base images and tag resolutions too.")] = False,
    filter_: Annotated[list[str], typer.Option("--filter", help="type==..., id=PREFIX, description~=REGEX, until=DURATION.")] = [],  # noqa: B006
    keep_storage: Annotated[str | None, typer.Option("--keep-storage", help="Stop once the cache is this small (e.g. 5GB).")] = None,
    keep_duration: Annotated[str | None, typer.Option("--keep-duration", help="Keep records used within this long (e.g. 24h).")] = None,
    force: Annotated[bool, typer.Option("-f", "--force", help="Do not ask for confirmation.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="List every record removed.")] = False,
) -> None:
    """Remove build cache, least recently used first."""
    from dockbuild.config import parse_duration, parse_size
    from dockbuild.engine import gc
    from dockbuild.engine.store import Store
    from dockbuild.errors import DockbuildError

    storage = parse_size(keep_storage, "--keep-storage") if keep_storage else None
    if storage is not None and storage.percent is not None:
        raise DockbuildError("--keep-storage takes a size, not a percentage")
    duration = parse_duration(keep_duration, "--keep-duration") if keep_duration else None
    gc.parse_filters(filter_)  # a bad filter fails before the question
    if not force:
        if not sys.stdin.isatty():
            raise DockbuildError("prune needs confirmation", hint="pass -f to prune without asking")
        answer = input("WARNING! This will remove build cache. Are you sure you want to continue? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return
    store = Store(shared=False)
    try:
        result = gc.prune(
            store,
            all_=all_,
            filters=filter_,
            keep_duration=duration,
            keep_storage=storage.bytes if storage else None,
            wait=False,
        )
        if result is None:
            print("waiting for running builds to finish ...", file=sys.stderr)
            result = gc.prune(
                store,
                all_=all_,
                filters=filter_,
                keep_duration=duration,
                keep_storage=storage.bytes if storage else None,
            )
        assert result is not None
        for record, size in result.removed if verbose else []:
            print(f"deleted: {gc.short_id(record.key):<27}{record.type:<17}{gc.human_size(size):>10}  {record.description}")
        print(f"Total:\t{gc.human_size(result.freed)} reclaimed ({len(result.removed)} records)")
    finally:
        store.close()


@debug_app.command("check-cache")
def debug_check_cache(
    repair: Annotated[bool, typer.Option("--repair", help="Drop what is broken (the next build makes it again).")] = False,
) -> None:
    """Verify every blob against its digest and every record against its layers."""
    from dockbuild.engine import gc
    from dockbuild.engine.store import Store

    store = Store(shared=False)
    try:
        problems = gc.check(store, repair=repair)
    finally:
        store.close()
    for line in problems:
        print(("repaired: " if repair else "broken: ") + line)
    if not problems:
        print("cache OK")
    elif not repair:
        print(f"{len(problems)} problem(s); run `dockbuild debug check-cache --repair` to drop them")
        sys.exit(1)


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


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    global _DEBUG
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["--version"], ["-v"]):
        print(f"dockbuild {__version__}")
        return
    _DEBUG = "--debug" in args or os.environ.get("DOCKBUILD_DEBUG") == "1"
    # SIGTERM stops a build the way Ctrl-C does: running steps killed, no mounts left.
    signal.signal(signal.SIGTERM, _interrupt)
    if args and args[0] not in SUBCOMMANDS:
        args.insert(0, "build")
    if os.geteuid() != 0 or args[:1] in (["build"], ["du"], ["prune"]):
        # Rootless (or root without CAP_SYS_ADMIN): the build runs in a user namespace.
        from dockbuild.userns import reexec

        reexec(args)
    from dockbuild.errors import DockbuildError

    try:
        code = app(args=args, prog_name="dockbuild", standalone_mode=False)
        # typer turns a KeyboardInterrupt (Ctrl-C, or SIGTERM above) into a returned 130.
        if isinstance(code, int) and code:
            if code == 130:
                print("ERROR: interrupted", file=sys.stderr)
            sys.exit(code)
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
        if _DEBUG:
            raise
        # A bug of ours, not the user's input: one line, and how to get the details.
        print(
            f"ERROR: internal error: {type(e).__name__}: {e}\n"
            "hint: run again with --debug for the traceback, and report it",
            file=sys.stderr,
        )
        sys.exit(1)
