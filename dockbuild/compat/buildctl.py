"""BuildKit's ``buildctl build`` command line (and ``buildctl-daemonless.sh``, which takes
the same arguments), run as a dockbuild build: there is no daemon to address.

``build --frontend dockerfile.v0 --local context=DIR --local dockerfile=DIR --opt ...``
becomes ``dockbuild build``; the other subcommands name what dockbuild offers instead.
docs/migrating-from-kaniko.md has the table of every flag and ``--opt``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from dockbuild.compat.goflags import LIST, SWITCH, VALUE, Flag, FlagError, Parsed, kv_list, parse
from dockbuild.compat.launch import Plan, run, usage_error
from dockbuild.compat.launch import script as console_script

PROGRAM = "buildctl"

_DAEMON = "dockbuild has no daemon: the build runs in this process"

GLOBAL_FLAGS = [
    Flag("addr", VALUE, ignored=_DAEMON),
    Flag("tlsservername", VALUE, ignored=_DAEMON),
    Flag("tlscacert", VALUE, ignored=_DAEMON),
    Flag("tlscert", VALUE, ignored=_DAEMON),
    Flag("tlskey", VALUE, ignored=_DAEMON),
    Flag("tlsdir", VALUE, ignored=_DAEMON),
    Flag("timeout", VALUE, ignored=_DAEMON),
    Flag("wait", SWITCH, ignored=_DAEMON),
    Flag("log-format", VALUE, ignored="dockbuild's own messages are plain text"),
    Flag("debug", SWITCH),
    Flag("help", SWITCH, "h"),
    Flag("version", SWITCH, "v"),
]

BUILD_FLAGS = [
    Flag("frontend", VALUE),
    Flag("local", LIST),
    Flag("oci-layout", LIST),
    Flag("opt", LIST),
    Flag("output", LIST, "o"),
    Flag("no-cache", SWITCH),
    Flag("export-cache", LIST),
    Flag("import-cache", LIST),
    Flag("secret", LIST),
    Flag("ssh", LIST),
    Flag("allow", LIST),
    Flag("metadata-file", VALUE),
    Flag("progress", VALUE),
    Flag("registry-auth-tlscontext", LIST),
    Flag("trace", VALUE, ignored="dockbuild writes no OpenTelemetry traces; `dockbuild history` keeps each build's record"),
    Flag("ref-file", VALUE, ignored="dockbuild's build record ID is shown by `dockbuild history ls`"),
    Flag("debug-json-cache-metrics", VALUE, ignored="`dockbuild history inspect` shows which steps were cached"),
    Flag("source-policy-file", VALUE, refused="dockbuild has no source policies; pin base images by digest in the Dockerfile"),
    Flag("proxy-network", SWITCH, refused="dockbuild has no proxy network mode; use --opt force-network-mode=none"),
    Flag("help", SWITCH, "h"),
]

# buildctl's other subcommands, and what dockbuild offers instead.
_INSTEAD = {
    "du": "dockbuild has no daemon; `dockbuild du` shows its cache",
    "prune": "dockbuild has no daemon; `dockbuild prune` trims its cache",
    "prune-histories": "`dockbuild history rm` removes build records",
    "debug": "`dockbuild debug` (parse, llb, info, check-cache) and `dockbuild history` look inside builds",
    "dial-stdio": "dockbuild has no daemon to dial",
}

_DOCKERFILE_SOURCES = ("docker/dockerfile", "docker.io/docker/dockerfile", "docker/dockerfile-upstream", "docker.io/docker/dockerfile-upstream")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        top = parse(GLOBAL_FLAGS, args, interspersed=False)
        if top.switch("version"):
            from dockbuild import __version__

            print(f"buildctl dockbuild {__version__} (buildctl command line)")
            return 0
        command = top.positional[:1]
        if top.switch("help") or not command or command == ["help"]:
            print(_help())
            return 0 if top.switch("help") or command else 2
        if command[0] in _INSTEAD:
            raise FlagError(f"`buildctl {command[0]}` is not supported: {_INSTEAD[command[0]]}")
        if command[0] not in ("build", "b"):
            raise FlagError(f"unknown command {command[0]!r}: dockbuild takes `buildctl build`")
        parsed = parse(BUILD_FLAGS, top.positional[1:])
        if parsed.switch("help"):
            print(_help())
            return 0
        plan = translate(parsed, debug=top.switch("debug"))
    except FlagError as e:
        return usage_error(PROGRAM, str(e))
    return run("dockbuild.compat.buildctl", args, plan, top.notes + parsed.notes)


def _help() -> str:
    return (
        "Usage: buildctl [global flags] build [flags]\n\n"
        "BuildKit's buildctl build command line, built by dockbuild (no daemon):\n"
        "  build --frontend dockerfile.v0 --local context=DIR --local dockerfile=DIR\n"
        "        [--opt filename=|target=|build-arg:K=V|platform=|context:NAME=|no-cache=]\n"
        "        [--output type=image,name=NAME,push=true] [--export-cache|--import-cache SPEC]\n"
        "        [--secret id=ID,src=FILE] [--ssh default] [--metadata-file FILE]\n"
        "See dockbuild's docs/migrating-from-kaniko.md for what each flag becomes.\n"
    )


def translate(p: Parsed, *, debug: bool = False) -> Plan:
    """buildctl build's flags as a dockbuild build (FlagError for what cannot be built)."""
    if p.positional:
        raise FlagError(f"unexpected argument: {p.positional[0]}")
    opts = [_opt(item) for item in p.items("opt")]
    _check_frontend(p.text("frontend"), opts)
    locals_ = dict(_pair(item, "--local", "NAME=DIR") for item in p.items("local"))
    layouts = dict(_pair(item, "--oci-layout", "NAME=DIR") for item in p.items("oci-layout"))
    plan = Plan()
    argv = ["build", "--progress", p.text("progress", "auto")]
    if debug:
        argv.append("--debug")
    context = locals_.get("context")
    dockerfile_dir = locals_.get("dockerfile")
    filename = "Dockerfile"
    for key, value in opts:
        handler = _OPTS.get(key) or _OPTS.get(key.partition(":")[0] + ":")
        if key in _IGNORED_OPTS:
            p.notes.append(f"note: ignoring --opt {key}: {_IGNORED_OPTS[key]}")
        elif key == "filename":
            filename = value
        elif key == "context":
            context = value  # a git URL or an HTTP tarball, as the gateway example passes
        elif key.startswith("context:"):
            argv += ["--build-context", f"{key.partition(':')[2]}={_named(value, locals_, layouts)}"]
        elif handler is not None:
            argv += handler(key, value)
        else:
            raise FlagError(f"--opt {key}: unknown frontend option for dockerfile.v0")
    if context is None:
        raise FlagError("--local context=DIR is required (or --opt context=GIT-URL)")
    if dockerfile_dir is not None:
        argv += ["-f", os.path.join(dockerfile_dir, filename)]
    elif filename != "Dockerfile" or "://" not in context:
        argv += ["-f", filename if "://" in context else os.path.join(context, filename)]
    if p.switch("no-cache"):
        argv.append("--no-cache")
    for spec in p.items("output"):
        argv += ["-o", _output(spec)]
    if not p.items("output"):
        argv += ["-o", "type=image"]  # buildctl keeps the result in its cache, exports nothing
    for spec in p.items("export-cache"):
        argv += ["--cache-to", spec]
    for spec in p.items("import-cache"):
        argv += ["--cache-from", spec]
    for flag in ("secret", "ssh", "allow"):
        for value in p.items(flag):
            argv += [f"--{flag}", value]
    if p.text("metadata-file"):
        argv += ["--metadata-file", p.text("metadata-file")]
    for value in p.items("registry-auth-tlscontext"):
        _tls_context(value, plan)
    argv.append(context)
    plan.argv = argv
    return plan


def _opt(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not key:
        raise FlagError(f"invalid --opt {item!r}: expected KEY=VALUE")
    return key, value


def _pair(item: str, flag: str, form: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not name or not sep or not value:
        raise FlagError(f"invalid {flag} {item!r}: expected {form}")
    return name, value


def _check_frontend(frontend: str, opts: list[tuple[str, str]]) -> None:
    if frontend == "dockerfile.v0":
        return
    if frontend == "gateway.v0":
        source = dict(opts).get("source", "")
        image = source.partition("@")[0]
        repo = image.rpartition(":")[0] if ":" in image.rpartition("/")[2] else image
        if repo in _DOCKERFILE_SOURCES:
            return
        raise FlagError(
            f"--frontend gateway.v0 --opt source={source}: dockbuild runs only the Dockerfile "
            "frontend (docker/dockerfile); other frontend images are not supported"
        )
    if not frontend:
        raise FlagError("--frontend is required: --frontend dockerfile.v0")
    raise FlagError(f"--frontend {frontend}: dockbuild runs dockerfile.v0 (or gateway.v0 with --opt source=docker/dockerfile)")


def _named(value: str, locals_: dict[str, str], layouts: dict[str, str]) -> str:
    """A named context: `local:NAME` is a --local directory, `oci-layout://NAME...` a --oci-layout."""
    if value.startswith("local:"):
        name = value.removeprefix("local:")
        if name not in locals_:
            raise FlagError(f"--opt context:...={value}: no --local {name}=DIR given")
        return locals_[name]
    if value.startswith("oci-layout://"):
        rest = value.removeprefix("oci-layout://")
        name, sep, ref = rest.partition("@")
        if not sep:
            name, sep, ref = rest.partition(":")
        if name not in layouts:
            raise FlagError(f"--opt context:...={value}: no --oci-layout {name}=DIR given")
        return f"oci-layout://{layouts[name]}" + (f"{sep}{ref}" if sep else "")
    return value


def _build_arg(key: str, value: str) -> list[str]:
    return ["--build-arg", f"{key.partition(':')[2]}={value}"]


def _label(key: str, value: str) -> list[str]:
    return ["--label", f"{key.partition(':')[2]}={value}"]


def _no_cache(_key: str, value: str) -> list[str]:
    return ["--no-cache"] if not value else ["--no-cache-filter", value]


def _add_hosts(_key: str, value: str) -> list[str]:
    out = []
    for item in value.split(","):
        if item:
            out += ["--add-host", item]
    return out


def _network(_key: str, value: str) -> list[str]:
    return ["--network", value]


def _resolve_mode(_key: str, value: str) -> list[str]:
    if value not in ("default", "pull", "local"):
        raise FlagError(f"--opt image-resolve-mode={value}: default, pull or local")
    return ["--pull"] if value == "pull" else []


def _refused(why: str) -> Callable[[str, str], list[str]]:
    def refuse(key: str, _value: str) -> list[str]:
        raise FlagError(f"--opt {key} is not supported: {why}")

    return refuse


_FRONTEND = "dockbuild runs its own Dockerfile frontend"
_IGNORED_OPTS = {
    "cmdline": _FRONTEND,
    "build-arg:BUILDKIT_SYNTAX": _FRONTEND,
    "dockerfilekey": "the Dockerfile comes from --local dockerfile=",
    "contextkey": "the context comes from --local context=",
}

_OPTS: dict[str, Callable[[str, str], list[str]]] = {
    "target": lambda _k, v: ["--target", v],
    "platform": lambda _k, v: ["--platform", v],
    "build-arg:": _build_arg,
    "label:": _label,
    "no-cache": _no_cache,
    "add-hosts": _add_hosts,
    "shm-size": lambda _k, v: ["--shm-size", v],
    "force-network-mode": _network,
    "image-resolve-mode": _resolve_mode,
    "source": lambda _k, _v: [],  # the frontend image, checked by _check_frontend
    "attest:": _refused("dockbuild makes no attestations (SBOM, provenance) yet"),
    "ulimit": _refused("dockbuild has no --ulimit yet"),
    "cgroup-parent": _refused("dockbuild has no --cgroup-parent"),
}


def _output(spec: str) -> str:
    """buildctl's --output: dockbuild reads the same specs; a tarball with no dest goes to stdout."""
    pairs = kv_list(spec)
    kind = dict(pairs).get("type", "")
    if kind in ("tar", "oci", "docker") and "dest" not in dict(pairs):
        return spec + ",dest=-"
    return spec


def _tls_context(value: str, plan: Plan) -> None:
    """--registry-auth-tlscontext host=HOST,insecure=BOOL,ca=FILE."""
    from dockbuild.compat.goflags import GO_BOOLS

    attrs = dict(kv_list(value))
    host = attrs.get("host", "").removeprefix("https://").removeprefix("http://").rstrip("/")
    if not host:
        raise FlagError(f"invalid --registry-auth-tlscontext {value!r}: host= is required")
    if attrs.get("cert") or attrs.get("key"):
        raise FlagError("--registry-auth-tlscontext cert=/key= is not supported: dockbuild has no registry client certificates yet")
    if GO_BOOLS.get(attrs.get("insecure", "false"), False):
        plan.registries.setdefault(host, {})["insecure"] = True
    if attrs.get("ca"):
        plan.certificates[host] = attrs["ca"]


def script() -> None:
    """The console script (``dockbuild-buildctl``)."""
    console_script(main)


if __name__ == "__main__":
    script()
