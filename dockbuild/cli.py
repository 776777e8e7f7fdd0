"""The command line: docker build / buildx flag names in, a BuildRequest out.

``dockbuild PATH`` means ``dockbuild build PATH``. The CLI holds no build logic; it turns
flags into a :class:`dockbuild.build.BuildRequest`, calls ``build()``, and prints
DockbuildErrors without a traceback (``--debug`` shows it). Flags are read with the
standard library's argparse, and each command imports only what it needs: start-up is
part of every command's time, and a cached build takes a quarter of a second.
"""

from __future__ import annotations

import os
import signal
import sys

from dockbuild import __version__

TYPE_CHECKING = False  # typing costs 5 ms to import, a tenth of `dockbuild version`
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any

    from dockbuild.build import BuildRequest
    from dockbuild.cliparser import Parser
    from dockbuild.engine.gc import DiskUsage
    from dockbuild.errors import Location

SUBCOMMANDS = {"build", "debug", "history", "version", "du", "prune", "--help", "-h"}

# The names --executor and --network take (the executor probe and the frontend check them
# again; tests/cli/test_cli_args.py keeps these lists equal to theirs).
EXECUTORS = ("auto", "namespace", "runc", "chroot")
# llb.NETWORK_MODES, spelled out: the command line is parsed before llb loads.
NETWORK_MODES = ("default", "none", "host")

# What the parsers add to the parsed flags besides the command's own parameters.
_PARSER_KEYS = {"run", "parser", "command", "debug_command", "history_command"}

_DEBUG = False


def _type_error(message: str) -> Exception:
    """The error an option's type function raises: argparse reports it as the flag's."""
    import argparse

    return argparse.ArgumentTypeError(message)


def _add_host(value: str) -> str:
    """The type of --add-host: ``HOST:IP`` or ``HOST=IP``, as ``HOST:IP``."""
    from dockbuild.engine.executor import parse_extra_host

    try:
        return parse_extra_host(value)
    except ValueError as e:
        raise _type_error(str(e)) from None


def _key_value(what: str) -> Callable[[str], tuple[str, str | None]]:
    """The type of a KEY=VALUE option (KEY alone gives None)."""

    def parse(item: str) -> tuple[str, str | None]:
        key, sep, value = item.partition("=")
        if not key:
            raise _type_error(f"invalid {what} {item!r}: expected KEY=VALUE")
        return key, value if sep else None

    return parse


def _named_value(item: str) -> tuple[str, str]:
    """The type of --build-context: NAME=VALUE, both given."""
    name, sep, value = item.partition("=")
    if not name or not sep or not value:
        raise _type_error(f"invalid build-context {item!r}: expected NAME=VALUE")
    return name, value


_RAM_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def _ram_bytes(item: str) -> int:
    """The type of --shm-size: bytes from docker's units (``64m``, ``1g``, ``1.5GiB``)."""
    import re

    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?) ?([kmgtp]?)(?:i?b)?", item.strip().lower())
    size = int(float(match.group(1)) * _RAM_UNITS[match.group(2)]) if match else 0
    if size <= 0:
        raise _type_error(
            f"invalid shm-size {item!r}: expected a size above 0, such as 64m or 1g"
        )
    return size


def build_cmd(
    context: str,
    file: str | None,
    tag: list[str],
    target: str | None,
    build_arg: list[tuple[str, str | None]],
    build_context: list[tuple[str, str]],
    output: list[str],
    label: list[tuple[str, str | None]],
    progress: str,
    quiet: bool,
    no_cache: bool,
    pull: bool,
    no_cache_filter: list[str],
    explain_cache: bool,
    cache_from: list[str],
    cache_to: list[str],
    platform: str | None,
    executor: str | None,
    network: str,
    add_host: list[str],
    shm_size: int | None,
    secret: list[str],
    ssh: list[str],
    allow: list[str],
    iidfile: str | None,
    metadata_file: str | None,
    push: bool,
    load: bool,
    squash: bool,
    check: bool,
    debug: bool,
) -> None:
    """Build an image from a Dockerfile."""
    global _DEBUG
    _DEBUG = _DEBUG or debug
    from dockbuild.build import BuildRequest, build

    request = BuildRequest(
        context=context,
        dockerfile=file,
        dockerfile_text=_stdin_dockerfile(context) if file == "-" else None,
        tags=tuple(tag),
        target=target,
        build_args=dict(build_arg),
        build_contexts=dict(build_context),
        outputs=tuple(output),
        labels={k: v or "" for k, v in label},
        progress="quiet" if quiet else progress,
        quiet=quiet,
        no_cache=no_cache,
        pull=pull,
        no_cache_filter=tuple(n for value in no_cache_filter for n in value.split(",") if n),
        explain_cache=explain_cache,
        cache_from=tuple(cache_from),
        cache_to=tuple(cache_to),
        platform=platform,
        executor=executor,
        network=network,
        add_hosts=tuple(add_host),
        shm_size=shm_size,
        secrets=tuple(secret),
        ssh=tuple(ssh),
        allow=tuple(a for value in allow for a in value.split(",") if a),
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
    result = build(request)
    if quiet and result.image_id:
        # `dockbuild -q . > image.tar`: the archive owns stdout, the ID goes to stderr.
        print(result.image_id, file=sys.stderr if result.wrote_stdout else sys.stdout)


def _run_checks(request: BuildRequest) -> None:
    """`--check`: print each warning with its rule, URL and Dockerfile lines; exit 1 if any."""
    from dockbuild.build import check

    warnings = check(request)
    out: list[str] = []
    for w in warnings:
        out.append(f"WARNING: {w.rule} - {w.url}" if w.url else f"WARNING: {w.rule}")
        out.append(w.message)
        if w.location is not None:
            out.append(f"{w.location.filename}:{w.location.start_line}")
            lines = _snippet(w.location)
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


def debug_parse(file: str) -> None:
    """Print the parsed Dockerfile in BuildKit's AST dump format."""
    from dockbuild.frontend import parser

    data = sys.stdin.buffer.read() if file == "-" else _read(file)
    sys.stdout.write(parser.dump(parser.parse(data, filename=file)) + "\n")


def debug_llb(
    context: str,
    file: str | None,
    target: str | None,
    build_arg: list[tuple[str, str | None]],
    build_context: list[tuple[str, str]],
    platform: str | None = None,
) -> None:
    """Print the LLB graph of a build as JSON (op digests are stable); each platform's
    under "platforms" when --platform names several."""
    import json

    from dockbuild.build import BuildRequest, definition

    request = BuildRequest(
        context=context,
        dockerfile=file,
        dockerfile_text=_stdin_dockerfile(context) if file == "-" else None,
        target=target,
        build_args=dict(build_arg),
        build_contexts=dict(build_context),
        progress="quiet",
        platform=platform,
    )
    print(json.dumps(definition(request), indent=2))


def debug_info() -> None:
    """Show how RUN steps would be executed here (the executor; the platforms run natively or
    through which emulator), and where the cache lives."""
    import json

    from dockbuild.engine.cacheroot import default_root
    from dockbuild.engine.executor.choice import choose
    from dockbuild.engine.executor.emulation import machine_info
    from dockbuild.engine.network import describe, settings_or_defaults

    root = default_root()
    choice = choose()
    info = {
        "cache_root": str(root),
        "executor": choice.info(root),
        "network": describe(settings_or_defaults()[0], choice.name),
        "platforms": machine_info(),
    }
    print(json.dumps(info, indent=2))


def du_cmd(verbose: bool, filter_: list[str]) -> None:
    """Show what the build cache holds, in bytes on disk (database included)."""
    from dockbuild.engine import gc
    from dockbuild.engine.store import Store

    store = Store()
    try:
        print(_render_du(gc.disk_usage(store, filter_), verbose))
    finally:
        store.close()


def _render_du(usage: DiskUsage, verbose: bool = False) -> str:
    """The disk-usage table (buildctl du's columns), or one block per record with -v."""
    import time

    from dockbuild.engine.gc import ago, human_size, short_id

    lines = []
    now = time.time()
    if verbose:
        for r, size, shared in usage.rows:
            lines += [
                f"ID:\t\t{short_id(r.key)}",
                f"Type:\t\t{r.type}",
                f"Description:\t{r.description}",
                f"Size:\t\t{human_size(size)}",
                f"Shared:\t\t{str(shared).lower()}",
                f"Layers:\t\t{len(r.layers)} ({len(r.owns)} own)",
                f"Created at:\t{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.created))}",
                f"Last used:\t{ago(r.last_used, now)}",
                "",
            ]
    else:
        lines.append(f"{'ID':<27}{'TYPE':<17}{'SIZE':>10}  {'LAST USED':<18}DESCRIPTION")
        for r, size, _ in usage.rows:
            desc = r.description if len(r.description) <= 60 else r.description[:57] + "..."
            lines.append(
                f"{short_id(r.key):<27}{r.type:<17}{human_size(size):>10}  {ago(r.last_used, now):<18}{desc}"
            )
        lines.append("")
    lines += [
        f"Records:\t{len(usage.rows)}",
        f"Database:\t{human_size(usage.database)}",
        f"Temporary:\t{human_size(usage.temporary)}",
        f"Unreferenced:\t{human_size(usage.unreferenced)}",
        f"Reclaimable:\t{human_size(usage.reclaimable)}",
        f"Total:\t\t{human_size(usage.total)}",
    ]
    return "\n".join(lines)


def prune_cmd(
    all_: bool,
    filter_: list[str],
    keep_storage: str | None,
    keep_duration: str | None,
    force: bool,
    verbose: bool,
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
        try:
            answer = input("WARNING! This will remove build cache. Are you sure you want to continue? [y/N] ")
        except EOFError:  # Ctrl-D at the question: no answer, an abort as with Ctrl-C
            print(file=sys.stderr)
            sys.exit(130)
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
        if all_:
            from dockbuild.engine.network import remove_unused

            remove_unused()  # the bridge and NAT rules, when no build uses them
    finally:
        store.close()


def debug_check_cache(repair: bool) -> None:
    """Verify every blob against its digest and every record against its layers."""
    from dockbuild import history
    from dockbuild.engine import gc
    from dockbuild.engine.store import Store

    store = Store(shared=False)
    try:
        problems = gc.check(store, repair=repair)
    finally:
        store.close()
    problems += history.check(store.root, repair=repair)
    for line in problems:
        print(("repaired: " if repair else "broken: ") + line)
    if not problems:
        print("cache OK")
    elif not repair:
        print(f"{len(problems)} problem(s); run `dockbuild debug check-cache --repair` to drop them")
        sys.exit(1)


def history_ls(format_: str, filter_: list[str]) -> None:
    """List build records, the newest first."""
    import json

    from dockbuild import history
    from dockbuild.engine.cacheroot import default_root

    tests = [_history_filter(f) for f in filter_]
    found = [r for r in history.records(default_root()) if all(test(r) for test in tests)]
    if format_ == "json":
        for r in found:
            print(json.dumps(_history_summary(r)))
        return
    if format_ != "table":
        from dockbuild.errors import UsageError

        raise UsageError(f"invalid --format {format_!r}", hint="table or json")
    rows = [("BUILD ID", "NAME", "STATUS", "CREATED AT", "DURATION", "CACHED")]
    for r in found:
        summary = _history_summary(r)
        rows.append((
            r["id"], r.get("name", ""), r.get("status", ""), _ago(r.get("started", 0.0)),
            f"{r.get('duration', 0.0):.1f}s", f"{summary['cached']}/{summary['steps']}",
        ))  # fmt: skip
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _history_summary(record: dict[str, Any]) -> dict[str, Any]:
    steps = record.get("steps", [])
    return {
        "id": record["id"],
        "name": record.get("name"),
        "status": record.get("status"),
        "started": record.get("started"),
        "duration": record.get("duration"),
        "steps": len(steps),
        "cached": sum(s.get("status") == "cached" for s in steps),
        "image_id": record.get("image_id"),
        "error": record.get("error"),
    }


def _history_filter(spec: str) -> Callable[[dict[str, Any]], bool]:
    """--filter KEY=VALUE or KEY!=VALUE on status, name or id (a prefix)."""
    from dockbuild.errors import UsageError

    key, negate, value = spec.partition("!=")
    if not negate:
        key, eq, value = spec.partition("=")
        if not eq:
            raise UsageError(f"invalid --filter {spec!r}", hint="KEY=VALUE or KEY!=VALUE; keys: status, name, id")
    if key not in ("status", "name", "id"):
        raise UsageError(f"invalid --filter key {key!r}", hint="status, name or id")

    def test(record: dict[str, Any]) -> bool:
        field = str(record.get(key) or "")
        hit = field.startswith(value) if key == "id" else field == value
        return hit != bool(negate)

    return test


def _ago(started: float) -> str:
    import time

    seconds = max(0, int(time.time() - started))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return f"{seconds} seconds ago"


def history_inspect(ref: str | None, format_: str) -> None:
    """Show a build record: its inputs, outputs, steps and errors (REF: an ID, ^N, or the
    newest when omitted)."""
    import json
    import time

    from dockbuild import history
    from dockbuild.engine.cacheroot import default_root

    r = history.find(default_root(), ref)
    if format_ == "json":
        print(json.dumps(r, indent=2))
        return
    steps = r.get("steps", [])
    cached = sum(s.get("status") == "cached" for s in steps)
    lines = [
        f"ID:             {r['id']}",
        f"Name:           {r.get('name', '')}",
        f"Context:        {r.get('context', '')}",
        f"Dockerfile:     {r.get('dockerfile', '')}",
        f"Target:         {r.get('target') or ''}",
        f"Platform:       {r.get('platform', '')}",
        f"Status:         {r.get('status', '')}",
        f"Started:        {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.get('started', 0)))}",
        f"Duration:       {r.get('duration', 0.0):.1f}s",
        f"Build Steps:    {len(steps)} ({cached} cached)",
    ]
    if r.get("build_args"):
        lines += ["", "Build Args:"] + [f"  {k}={'' if v is None else v}" for k, v in r["build_args"].items()]
    if r.get("secrets"):
        lines += ["", "Secrets:        " + ", ".join(r["secrets"])]
    if r.get("outputs"):
        lines += ["", "Outputs:"] + [f"  {o['type']} {o['dest']} {o.get('digest') or ''}".rstrip() for o in r["outputs"]]
    if r.get("image_id"):
        lines.append(f"Image ID:       {r['image_id']}")
    lines += ["", "Steps:"]
    for s in steps:
        state = {"cached": "CACHED", "done": "DONE", "error": "ERROR"}.get(s.get("status", ""), "CANCELED")
        lines.append(f"  #{s['number']:<3} {state:<8} {s.get('duration', 0.0):7.2f}s  {s['name']}")
    if r.get("warnings"):
        lines += ["", "Warnings:"] + [f"  {w}" for w in r["warnings"]]
    if r.get("error"):
        lines += ["", f"Error:          {r['error']}"]
    lines += ["", "Dockerfile text:", r.get("dockerfile_text", "").rstrip("\n")]
    print("\n".join(lines))


def history_logs(ref: str | None, step: int | None) -> None:
    """Print the whole log of a build (of one step with --step), in plain progress format."""
    from dockbuild import history
    from dockbuild.engine.cacheroot import default_root

    root = default_root()
    history.plain_log(root, history.find(root, ref), step, sys.stdout)


def history_rm(refs: list[str], all_: bool) -> None:
    """Remove build records."""
    from dockbuild import history
    from dockbuild.engine.cacheroot import default_root
    from dockbuild.errors import UsageError

    root = default_root()
    if all_:
        targets = history.records(root)
    elif refs:
        targets = [history.find(root, ref) for ref in refs]
    else:
        raise UsageError("history rm needs a build reference", hint="an ID, ^N, or --all")
    for record in targets:
        history.remove(root, record["id"])


def history_export(ref: str | None, output: str | None) -> None:
    """Write a build record (record.json and its logs) as a gzipped tarball."""
    from dockbuild import history
    from dockbuild.engine.cacheroot import default_root
    from dockbuild.errors import DockbuildError

    root = default_root()
    record = history.find(root, ref)
    if output is None or output == "-":
        if sys.stdout.isatty():
            raise DockbuildError("refusing to write a tarball to a terminal", hint="use -o FILE or a pipe")
        history.export(root, record, sys.stdout.buffer)
        sys.stdout.flush()
        return
    from pathlib import Path

    from dockbuild.atomic import output_file

    with output_file(Path(output)) as f:
        history.export(root, record, f)


def version_cmd() -> None:
    """Print the version."""
    print(f"dockbuild {__version__}")


def _command(
    commands: argparse._SubParsersAction[Parser],
    name: str,
    run: Callable[..., None],
    arguments: str = "",
    **kwargs: Any,
) -> Parser:
    """A subcommand: its help is ``run``'s docstring, its usage a short line."""
    parser: Parser = commands.add_parser(
        name,
        **kwargs,
        help=run.__doc__,
        description=run.__doc__,
        usage=f"%(prog)s [OPTIONS]{' ' + arguments if arguments else ''}",
    )
    parser.set_defaults(run=run, parser=parser)
    return parser


def _definition_flags(parser: Parser) -> None:
    """The flags that decide the build graph: shared by build and debug llb."""
    parser.add_argument("-f", "--file", metavar="FILE", help="Name of the Dockerfile (default: PATH/Dockerfile).")
    parser.add_argument("--target", metavar="STAGE", help="Target build stage.")
    parser.add_argument("--build-arg", metavar="KEY=VALUE", action="append", default=[], type=_key_value("build-arg"), help="Set build-time variables (KEY=VALUE, or KEY to take it from the environment).")
    parser.add_argument("--build-context", metavar="NAME=VALUE", action="append", default=[], type=_named_value, help="Additional build contexts (NAME=DIR|docker-image://REF|oci-layout://PATH[:TAG]|GIT-URL|HTTP-TAR-URL).")


def _parser() -> Parser:
    """The command line: the top-level parser, one sub-parser per command."""
    from dockbuild.cliparser import Parser

    parser = Parser(
        prog="dockbuild",
        usage="dockbuild [build] [OPTIONS] PATH\n       dockbuild COMMAND [OPTIONS] [ARGS]",
        description="Build container images from Dockerfiles, without a daemon.",
        epilog="'dockbuild COMMAND --help' describes a command and its options.",
    )
    parser.add_argument("-v", "--version", action="version", version=f"dockbuild {__version__}", help="Print the version and exit.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True, prog="dockbuild")

    build = _command(commands, "build", build_cmd, "PATH", docker_flags=True)
    build.add_argument("context", metavar="PATH", help="Build context: a directory, a git URL, an HTTP(S) tarball, or - for a tar (or a Dockerfile) on stdin.")
    _definition_flags(build)
    build.add_argument("-t", "--tag", metavar="NAME", action="append", default=[], help="Name and optionally a tag (name:tag).")
    build.add_argument("-o", "--output", metavar="SPEC", action="append", default=[], help="Output destination (type=docker|oci|image|registry|local|tar[,dest=PATH][,KEY=VALUE...]; PATH for local; - for a tar on stdout). See docs/outputs.md.")
    build.add_argument("--label", metavar="KEY=VALUE", action="append", default=[], type=_key_value("label"), help="Set metadata for an image (KEY=VALUE).")
    build.add_argument("--progress", metavar="MODE", default="auto", help="auto, plain, tty, rawjson or quiet (default: auto).")
    build.add_argument("-q", "--quiet", action="store_true", help="Suppress the build output and print the image ID on success.")
    build.add_argument("--no-cache", action="store_true", help="Do not use the cache when building.")
    build.add_argument("--pull", action="store_true", help="Always resolve base image tags again.")
    build.add_argument("--no-cache-filter", metavar="STAGES", action="append", default=[], help="Do not use the cache for these stages (comma-separated names).")
    build.add_argument("--explain-cache", action="store_true", help="Say, for every step that misses the cache, which input changed.")
    build.add_argument("--cache-from", metavar="SPEC", action="append", default=[], help="Import build cache (type=local,src=DIR | type=registry,ref=REF | REF).")
    build.add_argument("--cache-to", metavar="SPEC", action="append", default=[], help="Export build cache (type=local,dest=DIR | type=registry,ref=REF[,mode=min|max]).")
    build.add_argument("--platform", metavar="PLATFORMS", help="Target platforms, comma-separated (linux/amd64,linux/arm64,linux/arm/v7); default: this machine's.")
    build.add_argument("--executor", metavar="NAME", choices=EXECUTORS, help="How RUN steps run: namespace (default), runc, chroot; auto probes.")
    build.add_argument("--network", metavar="MODE", default="default", choices=NETWORK_MODES, help="Default network mode for RUN: default, none or host (default: default).")
    build.add_argument("--add-host", metavar="HOST:IP", action="append", default=[], type=_add_host, help="Add a line to /etc/hosts in RUN steps (HOST:IP or HOST=IP; IP may be host-gateway).")
    build.add_argument("--shm-size", metavar="SIZE", type=_ram_bytes, help="Size of /dev/shm in RUN steps (e.g. 64m, 1g).")
    build.add_argument("--secret", metavar="SPEC", action="append", default=[], help="Secret for RUN --mount=type=secret (id=ID[,src=FILE|,env=VAR]).")
    build.add_argument("--ssh", metavar="SPEC", action="append", default=[], help="SSH agent or keys for RUN --mount=type=ssh (default|ID[=SOCKET|KEY,...]).")
    build.add_argument("--allow", metavar="ENTITLEMENT", action="append", default=[], help="Allow an entitlement: network.host, security.insecure.")
    build.add_argument("--iidfile", metavar="FILE", help="Write the image ID to this file.")
    build.add_argument("--metadata-file", metavar="FILE", help="Write build result metadata to this file.")
    build.add_argument("--push", action="store_true", help="Shorthand for --output=type=registry (push the -t names).")
    build.add_argument("--load", action="store_true", help="Shorthand for --output=type=docker loaded into the local docker (docker load).")
    build.add_argument("--squash", action="store_true", help="Merge the layers the build adds on top of its base image into one.")
    build.add_argument("--check", action="store_true", help="Only run the build checks (lint rules) and report their warnings; build nothing.")
    build.add_argument("--debug", action="store_true", help="Show tracebacks for errors.")

    du = _command(commands, "du", du_cmd)
    du.add_argument("-v", "--verbose", action="store_true", help="One block of details per record.")
    du.add_argument("--filter", dest="filter_", metavar="FILTER", action="append", default=[], help="type==regular|exec.cachemount|..., id=PREFIX, description~=REGEX, until=DURATION.")

    prune = _command(commands, "prune", prune_cmd)
    prune.add_argument("-a", "--all", dest="all_", action="store_true", help="Remove base images and tag resolutions too.")
    prune.add_argument("--filter", dest="filter_", metavar="FILTER", action="append", default=[], help="type==..., id=PREFIX, description~=REGEX, until=DURATION.")
    prune.add_argument("--keep-storage", metavar="SIZE", help="Stop once the cache is this small (e.g. 5GB).")
    prune.add_argument("--keep-duration", metavar="DURATION", help="Keep records used within this long (e.g. 24h).")
    prune.add_argument("-f", "--force", action="store_true", help="Do not ask for confirmation.")
    prune.add_argument("-v", "--verbose", action="store_true", help="List every record removed.")

    _command(commands, "version", version_cmd)

    hist = commands.add_parser(
        "history",
        help="Build records: list, inspect, logs, rm, export.",
        description="Every build leaves a record in the cache root. REF is a build ID (or a unique prefix), ^N for the Nth build before the newest, or nothing for the newest.",
        usage="%(prog)s COMMAND [OPTIONS] [REF]",
    )
    history_commands = hist.add_subparsers(title="commands", metavar="COMMAND", dest="history_command", required=True, prog="dockbuild history")
    ls = _command(history_commands, "ls", history_ls)
    ls.add_argument("--format", dest="format_", metavar="FORMAT", default="table", help="table or json (one object a line).")
    ls.add_argument("--filter", dest="filter_", metavar="FILTER", action="append", default=[], help="status=completed|error|canceled, name=NAME, id=PREFIX (!= negates).")
    inspect = _command(history_commands, "inspect", history_inspect, "[REF]")
    inspect.add_argument("ref", metavar="REF", nargs="?", help="A build ID, ^N, or the newest when omitted.")
    inspect.add_argument("--format", dest="format_", metavar="FORMAT", default="pretty", choices=("pretty", "json"), help="pretty or json.")
    logs = _command(history_commands, "logs", history_logs, "[REF]")
    logs.add_argument("ref", metavar="REF", nargs="?", help="A build ID, ^N, or the newest when omitted.")
    logs.add_argument("--step", metavar="N", type=int, help="Only step #N.")
    rm = _command(history_commands, "rm", history_rm, "[REF...]")
    rm.add_argument("refs", metavar="REF", nargs="*", help="Build IDs or ^N.")
    rm.add_argument("--all", dest="all_", action="store_true", help="Remove every record.")
    exp = _command(history_commands, "export", history_export, "[REF]")
    exp.add_argument("ref", metavar="REF", nargs="?", help="A build ID, ^N, or the newest when omitted.")
    exp.add_argument("-o", "--output", metavar="FILE", help="Write the tarball here (default: stdout).")

    debug = commands.add_parser(
        "debug",
        help="Look inside a build: the parsed Dockerfile, the LLB graph.",
        description="Look inside a build: the parsed Dockerfile, the LLB graph.",
        usage="%(prog)s COMMAND [OPTIONS] [ARGS]",
    )
    debug_commands = debug.add_subparsers(title="commands", metavar="COMMAND", dest="debug_command", required=True, prog="dockbuild debug")
    parse = _command(debug_commands, "parse", debug_parse, "FILE")
    parse.add_argument("file", metavar="FILE", help="The Dockerfile to parse (- for stdin).")
    llb = _command(debug_commands, "llb", debug_llb, "PATH")
    llb.add_argument("context", metavar="PATH", help="Build context directory.")
    _definition_flags(llb)
    llb.add_argument("--platform", metavar="P[,P...]", help="Target platforms (default: this machine's); several print each one's graph under \"platforms\".")
    _command(debug_commands, "info", debug_info)
    check_cache = _command(debug_commands, "check-cache", debug_check_cache)
    check_cache.add_argument("--repair", action="store_true", help="Drop what is broken (the next build makes it again).")
    return parser


# -- the build command's fast path ------------------------------------------------------
#
# Building the argparse parsers costs more than a cached build's own work (about 10 ms of
# a 70 ms no-op rebuild). A build command line made only of the common flags, each spelled
# in full (`--flag VALUE`, `--flag=VALUE`, a switch) and one PATH, is read by
# _fast_build_args into the same arguments argparse gives build_cmd; anything else (help,
# a docker flag, `--pull=false`, a short flag cluster, a bad value, a usage error) goes
# to argparse. tests/cli/test_cli_fast_args.py holds both to the same result.

# option string -> (build_cmd parameter, how the value is kept: "one" or "append"),
# and the parameter's type, where the flag has one.
_FAST_VALUES: dict[str, tuple[str, str]] = {
    "-f": ("file", "one"), "--file": ("file", "one"),
    "--target": ("target", "one"),
    "--build-arg": ("build_arg", "append"),
    "--build-context": ("build_context", "append"),
    "-t": ("tag", "append"), "--tag": ("tag", "append"),
    "-o": ("output", "append"), "--output": ("output", "append"),
    "--label": ("label", "append"),
    "--progress": ("progress", "one"),
    "--no-cache-filter": ("no_cache_filter", "append"),
    "--cache-from": ("cache_from", "append"),
    "--cache-to": ("cache_to", "append"),
    "--platform": ("platform", "one"),
    "--executor": ("executor", "one"),
    "--network": ("network", "one"),
    "--secret": ("secret", "append"),
    "--ssh": ("ssh", "append"),
    "--allow": ("allow", "append"),
    "--iidfile": ("iidfile", "one"),
    "--metadata-file": ("metadata_file", "one"),
}  # fmt: skip
_FAST_SWITCHES: dict[str, str] = {
    "-q": "quiet", "--quiet": "quiet", "--no-cache": "no_cache", "--pull": "pull",
    "--explain-cache": "explain_cache", "--push": "push", "--load": "load",
    "--squash": "squash", "--check": "check", "--debug": "debug",
}  # fmt: skip
# build_cmd's parameters the fast path leaves at their argparse defaults.
_FAST_DEFAULTS: dict[str, object] = {"progress": "auto", "network": "default", "add_host": [], "shm_size": None}
_FAST_CHOICES: dict[str, tuple[str, ...]] = {"executor": EXECUTORS, "network": NETWORK_MODES}


def _fast_types() -> dict[str, Callable[[str], object]]:
    return {"build_arg": _key_value("build-arg"), "build_context": _named_value, "label": _key_value("label")}


def _fast_build_args(args: list[str]) -> dict[str, Any] | None:
    """build_cmd's arguments for a plain build command line, as argparse would give them;
    None for anything the fast path does not read (argparse then does)."""
    if not args or args[0] != "build":
        return None
    found: dict[str, Any] = {name: [] if kind == "append" else None for name, kind in _FAST_VALUES.values()}
    found.update(dict.fromkeys(_FAST_SWITCHES.values(), False))
    found.update({k: list(v) if isinstance(v, list) else v for k, v in _FAST_DEFAULTS.items()})
    code = build_cmd.__code__
    if set(found) | {"context"} != set(code.co_varnames[: code.co_argcount]):
        return None  # build_cmd has a flag these tables do not know: argparse reads it
    types = None
    context = None
    i = 1
    while i < len(args):
        word = args[i]
        i += 1
        if not word.startswith("-") or word == "-":
            if context is not None:
                return None
            context = word
            continue
        switch = _FAST_SWITCHES.get(word)
        if switch is not None:
            found[switch] = True
            continue
        option, sep, value = word.partition("=")
        if not sep:
            if i >= len(args):
                return None
            value = args[i]
            i += 1
        entry = _FAST_VALUES.get(option)
        if entry is None or (sep and option.startswith("-") and not option.startswith("--")):
            return None  # unknown, or `-o=x` (argparse keeps the `=`)
        name, kind = entry
        typed: object = value
        if name in ("build_arg", "build_context", "label"):
            types = types or _fast_types()
            try:
                typed = types[name](value)
            except Exception:  # argparse says what is wrong with it
                return None
        elif name in _FAST_CHOICES and value not in _FAST_CHOICES[name]:
            return None
        if kind == "append":
            found[name].append(typed)
        else:
            found[name] = typed
    if context is None:
        return None
    found["context"] = context
    return found


def _read(path: str) -> bytes:
    from dockbuild.errors import DockbuildError

    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DockbuildError(f"cannot read {path}: {e.strerror}") from e


# The Dockerfile read from stdin (`-f -`), for the snippets of its errors.
_STDIN_DOCKERFILE: bytes | None = None


def _stdin_dockerfile(context: str) -> bytes:
    """`-f -`: the Dockerfile from stdin (kept for error snippets)."""
    global _STDIN_DOCKERFILE
    from dockbuild.errors import UsageError

    if context == "-":
        raise UsageError(
            "the Dockerfile and the build context cannot both be read from stdin",
            hint="pass the context as a directory, or the Dockerfile with -f FILE",
        )
    _STDIN_DOCKERFILE = sys.stdin.buffer.read()
    return _STDIN_DOCKERFILE


def _snippet(location: Location) -> list[str]:
    """The Dockerfile lines around a location, BuildKit style (`>>>` marks its lines)."""
    from dockbuild.contexts import STDIN_DOCKERFILE_NAME

    if location.filename == STDIN_DOCKERFILE_NAME and _STDIN_DOCKERFILE is not None:
        text = _STDIN_DOCKERFILE.decode(errors="replace")
    else:
        try:
            with open(location.filename, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return []
    lines = text.splitlines()
    end = location.end_line or location.start_line
    first = max(1, location.start_line - 2)
    last = min(len(lines), end + 2)
    return [
        f" {n:>3} | {'>>>' if location.start_line <= n <= end else '   '} {lines[n - 1]}"
        for n in range(first, last + 1)
    ]


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
        snippet = _snippet(loc)
        if snippet:
            lines.append("--------------------")
            lines += snippet
            lines.append("--------------------")
    lines.append(f"ERROR: {err.message}")
    if err.hint:
        lines.append(f"hint: {err.hint}")
    print("\n".join(lines), file=sys.stderr)


# The signal that stopped the build: exit status 128 + its number, as a shell reports it.
_stopped_by = signal.SIGINT


def _interrupt(signum: int, _frame: object) -> None:
    global _stopped_by
    _stopped_by = signal.Signals(signum)
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
    try:
        fast = _fast_build_args(args)
        if fast is not None:  # a plain build command line: argparse need not load
            build_cmd(**fast)
            return
        parser = _parser()
        if not args:
            parser.print_help()
            sys.exit(2)  # as before: a script that forgot PATH fails
        ns, extra = parser.parse_known_args(args)
        if extra:
            option = next((w for w in extra if w.startswith("-") and w != "-"), None)
            if option:  # `--bogus=1` names the option, not its value
                ns.parser.error(f"no such option: {option.partition('=')[0]}")
            ns.parser.error(f"unexpected argument: {extra[0]}")
        if _DEBUG and ns.parser.notes:
            print("\n".join(ns.parser.notes), file=sys.stderr)
        ns.run(**{k: v for k, v in vars(ns).items() if k not in _PARSER_KEYS})
    except BrokenPipeError:
        # The reader of stdout went away (`dockbuild . | head -c 10`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        print("ERROR: interrupted", file=sys.stderr)
        sys.exit(128 + _stopped_by)
    except Exception as e:
        # Imported here, not at start-up: dockbuild.errors loads dataclasses (15 ms), which
        # `version`, `--help` and usage errors do not need.
        from dockbuild.errors import DockbuildError

        if _DEBUG:
            raise
        if not isinstance(e, DockbuildError):
            from dockbuild.engine.cacheroot import environment_error

            e = environment_error(e) or e  # a read-only HOME, a full disk: not our bug
        if isinstance(e, DockbuildError):
            _print_error(e)
            sys.exit(e.exit_status)
        # A bug of ours, not the user's input: one line, and how to get the details.
        print(
            f"ERROR: internal error: {type(e).__name__}: {e}\n"
            "hint: run again with --debug for the traceback, and report it",
            file=sys.stderr,
        )
        sys.exit(1)
