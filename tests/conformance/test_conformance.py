"""BuildKit's Dockerfile integration tests as data: every directory under cases/ is one
build through the real CLI, and the facts its case.toml states are checked on the image
(see README.md for the format)."""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clitools import DockbuildCLI, read_oci

CASES = Path(__file__).parent / "cases"
HTTP_MTIME = 1600000000


def _case_dirs() -> list[Path]:
    return sorted(p for p in CASES.iterdir() if (p / "case.toml").is_file())


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory, busybox_layout: Path) -> DockbuildCLI:
    """One cache root for every case: the busybox base is imported once."""
    return DockbuildCLI(tmp_path_factory.mktemp("conformance-cache"), busybox_layout)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass



@pytest.fixture(scope="session")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A loopback HTTP server for ADD <url> cases: (its document root, its base URL)."""
    root = tmp_path_factory.mktemp("http")

    def handler(*a: object, **kw: object) -> _Quiet:
        return _Quiet(*a, directory=str(root), **kw)  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# -- the image as a file tree -----------------------------------------------------------


@dataclass
class Entry:
    info: tarfile.TarInfo
    data: bytes | None


def _tree(layers: list[tarfile.TarFile]) -> dict[str, Entry]:
    """The image's final file system: the layers applied bottom first, whiteouts honoured."""
    tree: dict[str, Entry] = {}
    for layer in layers:
        members = layer.getmembers()
        for m in members:
            name = "/" + m.name.strip("/").removeprefix("./")
            parent, base = name.rsplit("/", 1)
            if base == ".wh..wh..opq":
                for k in [k for k in tree if k.startswith(parent + "/")]:
                    del tree[k]
            elif base.startswith(".wh."):
                gone = f"{parent}/{base[4:]}"
                for k in [k for k in tree if k == gone or k.startswith(gone + "/")]:
                    del tree[k]
        for m in members:
            name = "/" + m.name.strip("/").removeprefix("./")
            if name.rsplit("/", 1)[1].startswith(".wh."):
                continue
            if not m.isdir():
                for k in [k for k in tree if k.startswith(name + "/")]:
                    del tree[k]
            data = layer.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            if m.islnk():
                data = tree[("/" + m.linkname.strip("/")).removeprefix("/./")].data
            tree[name.rstrip("/") or "/"] = Entry(m, data)
    return tree


_KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}


def _check_file(tree: dict[str, Entry], fact: dict[str, object]) -> None:
    path = str(fact["path"])
    if path not in tree:
        top = "/" + path.strip("/").split("/")[0]
        near = sorted(k for k in tree if k == top or k.startswith(top + "/"))
        raise AssertionError(f"{path} is missing from the image; under {top}: {near}")
    entry = tree[path]
    info = entry.info
    if "content" in fact:
        assert entry.data is not None, f"{path} is not a regular file"
        assert entry.data.decode(errors="replace") == fact["content"], path
    if "contains" in fact:
        assert entry.data is not None and str(fact["contains"]) in entry.data.decode(errors="replace"), path
    if "mode" in fact:
        assert oct(info.mode & 0o7777) == oct(int(str(fact["mode"]), 8)), path
    if "owner" in fact:
        assert f"{info.uid}:{info.gid}" == fact["owner"], path
    if "link" in fact:
        assert info.issym() and info.linkname == fact["link"], path
    if "type" in fact:
        kind = _KINDS[str(fact["type"])]
        actual = tarfile.REGTYPE if info.type in (tarfile.AREGTYPE, tarfile.LNKTYPE) else info.type
        assert actual == kind, f"{path}: {info.type!r}"
    if "mtime" in fact:
        assert info.mtime == fact["mtime"], path
    if "hardlink_of" in fact:
        assert info.islnk() and "/" + info.linkname.strip("/") == fact["hardlink_of"], path


def _subset(actual: object, expected: object, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} is missing: {actual!r}"
            _subset(actual[key], value, f"{where}.{key}")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


# -- one case ------------------------------------------------------------------------


def _prepare(case: Path, spec: dict, tmp: Path, http_root: tuple[Path, str]) -> tuple[Path, list[str]]:
    ctx = tmp / "context"
    if (case / "context").is_dir():
        shutil.copytree(case / "context", ctx, symlinks=True)
    else:
        ctx.mkdir()
    setup = spec.get("setup", {})
    for name, target in setup.get("symlinks", {}).items():
        (ctx / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, ctx / name)
    for name in setup.get("sockets", []):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(ctx / name))
    for name in setup.get("dirs", []):
        (ctx / name).mkdir(parents=True, exist_ok=True)
    for name, value in setup.get("modes", {}).items():
        os.chmod(ctx / name, int(value, 8), follow_symlinks=False)
    for name, value in setup.get("owners", {}).items():
        uid, gid = (int(x) for x in value.split(":"))
        os.lchown(ctx / name, uid, gid)
    for name, value in setup.get("mtimes", {}).items():
        os.utime(ctx / name, (value, value), follow_symlinks=False)
    for name, members in setup.get("tars", {}).items():
        _make_tar(ctx / name, members)
    root, url = http_root
    served = root / case.name
    served.mkdir(exist_ok=True)
    for name, text in setup.get("http", {}).items():
        (served / name).write_text(text)
    for name, members in setup.get("http_tars", {}).items():
        _make_tar(served / name, members)
    for p in served.iterdir():  # Last-Modified: 2020-09-13T12:26:40Z
        os.utime(p, (HTTP_MTIME, HTTP_MTIME))
    args: list[str] = []
    has_dockerfile = (case / "Dockerfile").is_file()  # else the context URL holds it
    dockerfile = (case / "Dockerfile").read_text() if has_dockerfile else ""
    for name, repo in setup.get("git", {}).items():
        # served over the loopback HTTP server (git's dumb protocol), as BuildKit's test
        _make_git(served / name, repo)
        for ref in re.findall(r"\{REV:" + name + r":([^}]+)\}", dockerfile):
            rev = subprocess.run(["git", "-C", str(served / name), "rev-parse", ref], capture_output=True, text=True)
            dockerfile = dockerfile.replace(f"{{REV:{name}:{ref}}}", rev.stdout.strip())
    dockerfile = dockerfile.replace("{HTTP}", f"{url}/{case.name}")
    if "dockerfile_in_context" in spec:
        # The Dockerfile inside the context, found by its default names or named by -f.
        (ctx / spec["dockerfile_in_context"]).write_text(dockerfile)
        if spec.get("file_flag"):
            args += ["-f", str(ctx / spec["dockerfile_in_context"])]
    elif has_dockerfile:
        (tmp / "Dockerfile").write_text(dockerfile)
        args += ["-f", str(tmp / "Dockerfile")]
    for name, value in spec.get("build_args", {}).items():
        args += ["--build-arg", f"{name}={value}"]
    if "target" in spec:
        args += ["--target", spec["target"]]
    for name, value in spec.get("contexts", {}).items():
        args += ["--build-context", f"{name}={ctx / value}"]
    for name, text in spec.get("secrets", {}).items():
        (tmp / f"secret-{name}").write_text(text)
        args += ["--secret", f"id={name},src={tmp / f'secret-{name}'}"]
    if "ssh_key" in setup:
        # A fresh key for --ssh (BuildKit's test makes one the same way).
        key = tmp / "ssh-key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        args += ["--ssh", f"default={key}"]
    args += [a.replace("{HTTP}", f"{url}/{case.name}") for a in spec.get("args", [])]
    if "context_url" in spec:
        # a remote build context (git or HTTP), given where the context directory goes
        args += ["--", spec["context_url"].replace("{HTTP}", f"{url}/{case.name}")]
    return ctx, args


def _make_tar(path: Path, members: list[dict]) -> None:
    mode = {".tar": "w", ".gz": "w:gz", ".tgz": "w:gz", ".bz2": "w:bz2", ".xz": "w:xz"}[path.suffix]
    with tarfile.open(path, mode) as tf:
        for m in members:
            info = tarfile.TarInfo(m["name"])
            info.mode = int(m.get("mode", "0644"), 8)
            info.uid, info.gid = (int(x) for x in m.get("owner", "0:0").split(":"))
            info.mtime = m.get("mtime", 1600000000)
            if "link" in m:
                info.type, info.linkname = tarfile.SYMTYPE, m["link"]
                tf.addfile(info)
            elif "hardlink" in m:
                info.type, info.linkname = tarfile.LNKTYPE, m["hardlink"]
                tf.addfile(info)
            elif m["name"].endswith("/"):
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                data = m.get("content", "").encode()
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _make_git(path: Path, repo: dict) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_AUTHOR_DATE": "1600000000 +0000", "GIT_COMMITTER_DATE": "1600000000 +0000",
    }

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True, env=env)

    path.mkdir(parents=True)
    git("init", "-q", "-b", "main")
    for i, commit in enumerate(repo["commits"]):
        for name, text in commit.get("files", {}).items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text)
        git("add", "-A")
        git("commit", "-q", "-m", f"commit {i}")
        for tag in commit.get("tags", []):
            git("tag", tag)
    git("update-server-info")


@pytest.mark.parametrize("case", _case_dirs(), ids=lambda p: p.name)
def test_case(case: Path, cli: DockbuildCLI, tmp_path: Path, http_root: tuple[Path, str]) -> None:
    spec = tomllib.loads((case / "case.toml").read_text())
    if "skip" in spec:
        pytest.skip(spec["skip"])
    ctx, args = _prepare(case, spec, tmp_path, http_root)
    named: list[str] = []
    for base in spec.get("base", []):
        # Images built first (as BuildKit's tests push them), in order, each named as a
        # context of the builds after it.
        layout = tmp_path / f"base-{base['name']}"
        dockerfile = tmp_path / f"{base['name']}.Dockerfile"
        dockerfile.write_text((case / base["dockerfile"]).read_text())
        cli.build(ctx, *named, "-f", str(dockerfile), "-o", f"type=oci,tar=false,dest={layout}")
        for context in base.get("as", [base["name"]]):
            named += ["--build-context", f"{context}=oci-layout://{layout}"]
    args += named
    first = _build_and_check(cli, ctx, args, spec, tmp_path / "image.tar")
    for step in spec.get("rebuild", []):
        # The same case built again on the same cache: changed build args or context
        # files, and the facts that must hold then (cache hits show in the facts).
        for name in step.get("remove", []):
            shutil.rmtree(ctx / name) if (ctx / name).is_dir() else (ctx / name).unlink()
        for name, text in step.get("write", {}).items():
            (ctx / name).write_text(text)
        again = [*args, *step.get("args", [])]
        for name, value in step.get("build_args", {}).items():
            again += ["--build-arg", f"{name}={value}"]
        first = _build_and_check(cli, ctx, again, step, tmp_path / "image.tar", first)


def _build_and_check(
    cli: DockbuildCLI, ctx: Path, args: list[str], spec: dict, out: Path, first: dict[str, Entry] | None = None
) -> dict[str, Entry]:
    output = f"type=oci,dest={out}" + "".join(f",{k}={v}" for k, v in spec.get("output_attrs", {}).items())
    if "--" in args:  # a context URL instead of the directory
        cut = args.index("--")
        run = cli("--progress=plain", *cli.base_context, *args[:cut], "-o", output, args[cut + 1], check=False)
    else:
        run = cli.build(ctx, *args, "-o", output, check=False)
    if "error" in spec:
        expected = spec["error"]
        assert run.returncode != 0, f"the build should fail:\n{run.stderr}"
        assert "Traceback" not in run.stderr
        for text in _as_list(expected.get("contains", [])):
            assert text in run.stderr + run.out, f"{text!r} not in:\n{run.stderr}"
        if "line" in expected:
            assert f"Dockerfile:{expected['line']}" in run.stderr, run.stderr
        return {}
    assert run.returncode == 0, run.stderr
    for text in _as_list(spec.get("output", {}).get("contains", [])):
        assert text in run.stderr, f"{text!r} not in the build output"
    for warning in spec.get("warnings", []):
        # a build check's warning, as the build prints it
        text = f"WARNING: {warning['rule']}: {warning['detail']} (line {warning['line']})"
        assert text in run.stderr, f"{text!r} not in the build output:\n{run.stderr}"
    if "warnings" in spec:
        count = run.stderr.count("\nWARNING: ")
        assert count == len(spec["warnings"]), f"{count} warnings:\n{run.stderr}"
    for text in _as_list(spec.get("output", {}).get("lacks", [])):
        assert text not in run.stderr, f"{text!r} in the build output"
    image = read_oci(out)
    tree = _tree(image.layers)
    tree["<manifest>"] = Entry(tarfile.TarInfo("<manifest>"), json.dumps(image.manifest).encode())
    tree["<layers>"] = Entry(tarfile.TarInfo("<layers>"), json.dumps(image.manifest["layers"]).encode())
    if first is not None and "same_layers" in spec:
        same = tree["<layers>"].data == first["<layers>"].data
        assert same == spec["same_layers"], f"the layers are the build before's: {same}"
    if first is not None and "same_image" in spec:
        same = tree["<manifest>"].data == first["<manifest>"].data
        assert same == spec["same_image"], f"the image is the build before's: {same}"
    for fact in spec.get("file", []):
        _check_file(tree, fact)
        if first is not None and "same" in fact:
            # "same = true": the content the build before gave (a cache hit), "false": new
            same = tree[fact["path"]].data == first[fact["path"]].data
            assert same == fact["same"], f"{fact['path']}: same as the build before: {same}"
    for path in spec.get("absent", []):
        assert path not in tree, f"{path} should not be in the image"
    if "config" in spec:
        _subset(image.config.get("config", {}), spec["config"], "config")
    for item in spec.get("env_has", []):
        assert item in image.config.get("config", {}).get("Env", []), item
    if "image" in spec:
        _subset(image.config, spec["image"], "image")
    if "history" in spec:
        history = spec["history"]
        entries = image.history
        if "count" in history:
            assert len(entries) == history["count"], entries
        created = [h.get("created_by", "") for h in entries]
        for text in _as_list(history.get("created_by", [])):
            assert any(text in c for c in created), f"{text!r} not in {created}"
        tail = history.get("tail", [])
        for want, got in zip(tail, entries[len(entries) - len(tail) :], strict=True):
            # the last entries, in order: what created them and whether they made a layer
            assert want.get("created_by", "") in got.get("created_by", ""), (want, got)
            if "empty_layer" in want:
                assert bool(got.get("empty_layer")) == want["empty_layer"], (want, got)
            if "lacks" in want:
                assert want["lacks"] not in got.get("created_by", ""), (want, got)
            assert got.get("created"), got
        if "created" in history:  # every entry's time, as RFC 3339
            assert all(h.get("created") == history["created"] for h in entries), entries
        if "empty_layers" in history:
            assert sum(bool(h.get("empty_layer")) for h in entries) == history["empty_layers"]
    if "layers" in spec:
        assert len(image.layers) == spec["layers"]
    return tree


def _as_list(value: object) -> list[str]:
    return [value] if isinstance(value, str) else list(value)  # type: ignore[arg-type]
