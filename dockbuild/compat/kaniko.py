"""kaniko's executor command line (``/kaniko/executor --context . --destination ...``),
run as a dockbuild build.

Every executor flag of kaniko is known here (cmd/executor/cmd/root.go): a flag is mapped
to dockbuild's own flag or config, accepted and ignored with a note when it means
nothing to dockbuild, or refused with what to do instead. docs/migrating-from-kaniko.md
has the table.
"""

from __future__ import annotations

import os
import sys

from dockbuild.compat.goflags import LIST, SWITCH, VALUE, Flag, FlagError, Parsed, parse
from dockbuild.compat.launch import Plan, run, scratch_dir, usage_error
from dockbuild.compat.launch import script as console_script

PROGRAM = "executor"

_SNAPSHOTS = "dockbuild takes no file system snapshots: a RUN's changes are its overlay's upper directory"
_OWN_FS = "dockbuild never builds in its own root file system"

FLAGS = [
    # What to build.
    Flag("context", VALUE, "c"),
    Flag("context-sub-path", VALUE),
    Flag("dockerfile", VALUE, "f"),
    Flag("build-arg", LIST),
    Flag("target", VALUE),
    Flag("custom-platform", VALUE),
    Flag("customPlatform", VALUE, alias_of="custom-platform"),
    Flag("git", LIST),
    Flag("label", LIST),
    Flag("reproducible", SWITCH),
    Flag("single-snapshot", SWITCH),
    # Where it goes.
    Flag("destination", LIST, "d"),
    Flag("no-push", SWITCH),
    Flag("tar-path", VALUE),
    Flag("tarPath", VALUE, alias_of="tar-path"),
    Flag("oci-layout-path", VALUE),
    Flag("digest-file", VALUE),
    Flag("image-name-with-digest-file", VALUE),
    Flag("image-name-tag-with-digest-file", VALUE),
    Flag("compression", VALUE),
    Flag("compression-level", VALUE),
    # Cache.
    Flag("cache", SWITCH),
    Flag("cache-repo", VALUE),
    Flag("no-push-cache", SWITCH),
    Flag("cache-ttl", VALUE, ignored="registry cache entries do not expire in dockbuild; `dockbuild prune` trims the local cache"),
    Flag("cache-dir", VALUE, ignored="base images are kept in dockbuild's cache root ($DOCKBUILD_ROOT)"),
    Flag("cache-copy-layers", SWITCH, ignored="every step, COPY included, is cached"),
    Flag("cache-run-layers", SWITCH, ignored="every step, RUN included, is cached"),
    Flag("compressed-caching", SWITCH, ignored="the cache keeps each layer once, compressed when exported"),
    # Registries.
    Flag("insecure", SWITCH),
    Flag("insecure-pull", SWITCH),
    Flag("skip-tls-verify", SWITCH),
    Flag("skip-tls-verify-pull", SWITCH),
    Flag("insecure-registry", LIST),
    Flag("skip-tls-verify-registry", LIST),
    Flag("registry-mirror", LIST),
    Flag("registry-map", LIST),
    Flag("registry-certificate", LIST),
    Flag("registry-client-cert", LIST, refused="dockbuild has no client certificates (mTLS) for registries yet"),
    Flag("skip-default-registry-fallback", SWITCH, ignored="dockbuild tries a registry's mirrors, then the registry itself"),
    Flag("push-retry", VALUE, ignored="dockbuild retries a failed blob upload itself"),
    Flag("push-ignore-immutable-tag-errors", SWITCH, ignored="a refused tag fails the push"),
    Flag("image-download-retry", VALUE, ignored="dockbuild retries failed downloads itself"),
    Flag("image-fs-extract-retry", VALUE, ignored="layers are unpacked once into the cache, and checked"),
    Flag("skip-push-permission-check", SWITCH, ignored="dockbuild checks no push permission before the build"),
    # How kaniko works inside: nothing to do here.
    Flag("verbosity", VALUE, "v"),
    Flag("log-format", VALUE, ignored="dockbuild's progress is plain text in CI"),
    Flag("log-timestamp", SWITCH, ignored="dockbuild's plain progress shows each step's duration"),
    Flag("force", SWITCH, ignored=_OWN_FS),
    Flag("cleanup", SWITCH, ignored=_OWN_FS),
    Flag("kaniko-dir", VALUE, ignored=_OWN_FS),
    Flag("snapshot-mode", VALUE, ignored=_SNAPSHOTS),
    Flag("snapshotMode", VALUE, ignored=_SNAPSHOTS),
    Flag("use-new-run", SWITCH, ignored=_SNAPSHOTS),
    Flag("ignore-var-run", SWITCH, ignored=_OWN_FS),
    Flag("whitelist-var-run", SWITCH, ignored=_OWN_FS),
    Flag("ignore-path", LIST, ignored=_OWN_FS),
    Flag("skip-unused-stages", SWITCH, ignored="dockbuild builds only the stages the target needs"),
    Flag("force-build-metadata", SWITCH, ignored="every step gets its history entry"),
    Flag("azure-container-registry-config", VALUE, ignored="credentials come from $DOCKER_CONFIG/config.json"),
    Flag("bucket", VALUE, "b", refused="fetch the context from the bucket first, and pass it as --context dir:// or tar://"),
    Flag("help", SWITCH, "h"),
]

_GO_DURATION = "ns|us|µs|ms|s|m|h"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["version"]:
        from dockbuild import __version__

        print(f"dockbuild {__version__} (kaniko executor command line)")
        return 0
    try:
        parsed = parse(FLAGS, args)
        if parsed.switch("help"):
            print(_help())
            return 0
        plan = translate(parsed)
    except FlagError as e:
        return usage_error(PROGRAM, str(e))
    return run("dockbuild.compat.kaniko", args, plan, parsed.notes)


def _help() -> str:
    return (
        "Usage: executor [flags]\n\n"
        "kaniko's executor command line, built by dockbuild: --context, --dockerfile,\n"
        "--destination (repeatable), --build-arg, --no-push, --tar-path, --digest-file,\n"
        "--cache, --cache-repo and the rest of kaniko's flags. See dockbuild's\n"
        "docs/migrating-from-kaniko.md for what each flag becomes.\n"
    )


def translate(p: Parsed) -> Plan:
    """kaniko's flags as a dockbuild build (raises FlagError for what cannot be built)."""
    if p.positional:
        raise FlagError(f"unexpected argument: {p.positional[0]} (the executor takes flags only)")
    plan = Plan()
    env_no_push = os.environ.get("KANIKO_NO_PUSH")
    no_push = p.switch("no-push")
    if env_no_push is not None:  # kaniko lets the variable override the flag
        from dockbuild.compat.goflags import GO_BOOLS

        if env_no_push not in GO_BOOLS:
            raise FlagError(f"invalid value {env_no_push!r} for KANIKO_NO_PUSH (true or false)")
        no_push = GO_BOOLS[env_no_push]
    destinations = p.items("destination")
    if not no_push and not destinations:
        raise FlagError("you must provide --destination, or use --no-push")

    context = _context(p, plan)
    argv = ["build", "--progress", _progress(p.text("verbosity", "info"))]
    argv += ["-f", _dockerfile(p.text("dockerfile", "Dockerfile"), context)]
    for arg in p.items("build-arg"):
        argv += ["--build-arg", arg]
    for label in p.items("label"):
        argv += ["--label", label]
    if p.text("target"):
        argv += ["--target", p.text("target")]
    if p.text("custom-platform"):
        argv += ["--platform", p.text("custom-platform")]
    if p.switch("single-snapshot"):
        argv.append("--squash")  # base layers + one layer, as kaniko's single snapshot
    image_keys = _image_keys(p)
    names = ",".join(destinations)
    if destinations and not (no_push and (p.text("tar-path") or p.text("oci-layout-path"))):
        # --no-push alone: built, digests reported, kept nowhere, as the user asked.
        push = "true" if not no_push else "false,store=false"
        argv += ["-o", f'type=image,"name={names}",push={push}{image_keys}']
    if p.text("tar-path"):
        # kaniko tags an untagged --no-push tarball with a placeholder name.
        tar_names = names or "unset-repo/unset-image:latest"
        argv += ["-o", f'type=docker,"name={tar_names}",dest={p.text("tar-path")}{image_keys}']
    if p.text("oci-layout-path"):
        argv += ["-o", f"type=oci,tar=false,dest={p.text('oci-layout-path')}{image_keys}"]
    if not (destinations or p.text("tar-path") or p.text("oci-layout-path")):
        argv += ["-o", f"type=image,push=false,store=false{image_keys}"]  # built, its digest reported
    if p.switch("reproducible"):
        argv += ["--build-arg", "SOURCE_DATE_EPOCH=0"]
    argv += _cache_flags(p, destinations)
    _registries(p, plan, destinations)
    _digest_files(p, plan, argv, destinations)
    argv.append(context)
    plan.argv = argv
    _docker_config(plan)
    return plan


def _progress(verbosity: str) -> str:
    levels = ("panic", "fatal", "error", "warn", "info", "debug", "trace")
    if verbosity not in levels:
        raise FlagError(f"invalid --verbosity {verbosity!r}: one of {', '.join(levels)}")
    return "quiet" if levels.index(verbosity) < levels.index("info") else "plain"


def _context(p: Parsed, plan: Plan) -> str:
    """The context as dockbuild takes it: a directory (a tar is unpacked into one) or a git URL."""
    context = p.text("context", "/workspace/")
    scheme, sep, rest = context.partition("://")
    if not sep:
        scheme, rest = "dir", context
    sub = p.text("context-sub-path")
    if scheme == "dir":
        return os.path.join(rest, sub) if sub else rest
    if scheme == "tar":
        if rest.startswith(("http://", "https://")) or not os.path.isfile(rest):
            raise FlagError(f"--context tar://{rest}: expected a local .tar or .tar.gz file")
        target = scratch_dir("dockbuild-kaniko-context-")
        plan.before.append(lambda: _unpack(rest, target))
        return os.path.join(target, sub) if sub else target
    if scheme == "git":
        # kaniko clones git://HOST/REPO#REF over https (GIT_PULL_METHOD=http for http).
        method = os.environ.get("GIT_PULL_METHOD", "https")
        url, _, ref = rest.partition("#")
        for option in p.items("git"):
            for item in option.split(","):
                key, _, value = item.partition("=")
                if key == "branch" and value and not ref:
                    ref = f"refs/heads/{value}"
        fragment = ref + (f":{sub}" if sub else "")
        return f"{method}://{url}" + (f"#{fragment}" if fragment else "")
    if scheme in ("https", "http"):
        return context  # an HTTP(S) tarball
    raise FlagError(
        f"--context {scheme}:// is not supported: fetch the context first and pass it as "
        "a directory (dir://) or a tarball (tar://); git:// and https:// tarballs work"
    )


def _unpack(archive: str, target: str) -> None:
    import tarfile

    from dockbuild.errors import DockbuildError

    try:
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    except (OSError, tarfile.TarError) as e:
        raise DockbuildError(f"--context tar://{archive}: cannot unpack: {e}") from e


def _dockerfile(path: str, context: str) -> str:
    """kaniko's lookup: the path as given (from the working directory), else in the context."""
    if "://" in context or os.path.isabs(path) or os.path.exists(path):
        return path  # for a git or HTTP context: its path inside the context
    return os.path.join(context, path)


def _image_keys(p: Parsed) -> str:
    keys = ""
    if p.text("compression"):
        keys += f",compression={p.text('compression')}"
    if p.text("compression-level"):
        keys += f",compression-level={p.text('compression-level')}"
    if p.switch("reproducible"):
        keys += ",rewrite-timestamp=true"
    return keys


def _cache_flags(p: Parsed, destinations: list[str]) -> list[str]:
    """--cache: BuildKit's registry cache in --cache-repo (or DESTINATION/cache, as kaniko)."""
    ttl = p.text("cache-ttl")
    if ttl:
        import re

        if not re.fullmatch(rf"([0-9]+(\.[0-9]+)?({_GO_DURATION}))+|0", ttl):
            raise FlagError(f'invalid argument "{ttl}" for "--cache-ttl" flag: a duration such as 6h')
    if not p.switch("cache"):
        return []
    repo = p.text("cache-repo")
    if not repo:
        if not destinations:
            raise FlagError("--cache needs --cache-repo, or a --destination to put the cache beside")
        repo = _repository(destinations[0]) + "/cache"
    if repo.startswith("oci:"):
        path = repo.removeprefix("oci:")
        out = ["--cache-from", f"type=local,src={path}"]
        return out + ([] if p.switch("no-push-cache") else ["--cache-to", f"type=local,dest={path},mode=max"])
    ref = repo if _has_tag(repo) else f"{repo}:buildcache"
    out = ["--cache-from", f"type=registry,ref={ref}"]
    if not p.switch("no-push-cache"):
        out += ["--cache-to", f"type=registry,ref={ref},mode=max"]
    return out


def _repository(name: str) -> str:
    """NAME without its tag or digest."""
    name = name.partition("@")[0]
    head, sep, tail = name.rpartition(":")
    return head if sep and "/" not in tail else name


def _has_tag(name: str) -> bool:
    return _repository(name) != name


def _host(name: str) -> str:
    """The registry host of an image name (docker.io when it names none)."""
    first, sep, _ = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def _registries(p: Parsed, plan: Plan, destinations: list[str]) -> None:
    """Mirrors, insecure hosts and CA files, as dockbuild's config (buildkitd.toml's keys)."""
    hosts: set[str] = set()
    if p.switch("insecure") or p.switch("skip-tls-verify"):
        hosts |= {_host(d) for d in destinations}
        if p.text("cache-repo") and not p.text("cache-repo").startswith("oci:"):
            hosts.add(_host(p.text("cache-repo")))
    if p.switch("insecure-pull") or p.switch("skip-tls-verify-pull"):
        hosts |= _base_image_hosts(plan, p)
    hosts |= set(p.items("insecure-registry")) | set(p.items("skip-tls-verify-registry"))
    for host in sorted(hosts):
        plan.registries.setdefault(host, {})["insecure"] = True
    mirrors = list(p.items("registry-mirror"))
    if os.environ.get("KANIKO_REGISTRY_MIRROR"):
        mirrors.append(os.environ["KANIKO_REGISTRY_MIRROR"])
    mirrors = [m for value in mirrors for m in value.split(",") if m]
    if mirrors:
        plan.registries.setdefault("docker.io", {})["mirrors"] = mirrors
    for value in p.items("registry-map"):
        for item in value.split(";"):
            original, sep, mirror = item.partition("=")
            if not sep or not original or not mirror:
                raise FlagError(f"invalid --registry-map {item!r}: expected ORIGINAL=MIRROR[;...]")
            listed = plan.registries.setdefault(original, {}).setdefault("mirrors", [])
            listed += [m for m in mirror.split(",") if m]
    for value in p.items("registry-certificate"):
        host, sep, path = value.partition("=")
        if not sep or not host or not path:
            raise FlagError(f"invalid --registry-certificate {value!r}: expected HOST=CA-FILE")
        plan.certificates[host] = path


def _base_image_hosts(plan: Plan, p: Parsed) -> set[str]:
    """The registries the Dockerfile's FROM lines name (for --insecure-pull): kaniko's flag
    names no host, dockbuild's config does."""
    import re

    path = _dockerfile(p.text("dockerfile", "Dockerfile"), p.text("context", "/workspace/").removeprefix("dir://"))
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return set()
    names = re.findall(r"(?im)^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)", text)
    return {_host(n) for n in names if "$" not in n}


def _digest_files(p: Parsed, plan: Plan, argv: list[str], destinations: list[str]) -> None:
    """--digest-file and the image-name ones, from the build's --metadata-file."""
    wanted = {
        "digest": p.text("digest-file"),
        "name": p.text("image-name-with-digest-file"),
        "tag": p.text("image-name-tag-with-digest-file"),
    }
    if not any(wanted.values()):
        return
    metadata = os.path.join(scratch_dir("dockbuild-kaniko-"), "metadata.json")
    argv += ["--metadata-file", metadata]

    def write() -> None:
        import json
        from pathlib import Path

        from dockbuild.outputs.metadata import write_atomic

        digest = json.loads(Path(metadata).read_text())["containerimage.digest"]
        if wanted["digest"]:
            write_atomic(Path(wanted["digest"]), digest.encode())
        for kind in ("name", "tag"):
            if wanted[kind]:
                lines = "".join(_name_with_digest(d, digest, kind == "tag") for d in destinations)
                write_atomic(Path(wanted[kind]), lines.encode())

    plan.after.append(write)


def _name_with_digest(destination: str, digest: str, with_tag: bool) -> str:
    """A line as kaniko writes it: go-containerregistry's full repository name (Docker Hub
    names as index.docker.io/library/NAME), `:TAG` (latest when none) if asked, `@DIGEST`."""
    repo = _repository(destination)
    tag = destination.partition("@")[0][len(repo) + 1 :] or "latest"
    if _host(repo) == "docker.io":
        path = repo.split("/", 1)[1] if repo.split("/", 1)[0] in ("docker.io", "index.docker.io") else repo
        repo = "index.docker.io/" + (path if "/" in path else f"library/{path}")
    return f"{repo}{':' + tag if with_tag else ''}@{digest}\n"


def _docker_config(plan: Plan) -> None:
    """kaniko's image keeps credentials in /kaniko/.docker/config.json (DOCKER_CONFIG)."""
    if "DOCKER_CONFIG" not in os.environ and os.path.isfile("/kaniko/.docker/config.json"):
        plan.env["DOCKER_CONFIG"] = "/kaniko/.docker"


def script() -> None:
    """The console script (``dockbuild-kaniko``)."""
    console_script(main)


if __name__ == "__main__":
    script()
