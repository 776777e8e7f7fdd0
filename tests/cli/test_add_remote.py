"""ADD from HTTP(S) URLs and git repositories, through the real CLI, against a local HTTP
server and a `git daemon` on loopback (both started here)."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clitools import DockbuildCLI, write_context

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


TOKEN = "s3cr3t-token-value"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    """Files of a directory; those under /private/ need ``Authorization: Bearer TOKEN``."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/private/") and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_error(401)
            return
        super().do_GET()


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("www")
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def _git(*args: str, cwd: Path) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", GIT_AUTHOR_DATE="1600000000 +0000",
               GIT_COMMITTER_DATE="1600000000 +0000")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """git://127.0.0.1:PORT/r.git with a tag v1 (sub/s.txt, run.sh executable), and its commit."""
    base = tmp_path_factory.mktemp("git")
    work = base / "work"
    work.mkdir()
    _git("init", "-q", "-b", "main", cwd=work)
    (work / "sub").mkdir()
    (work / "sub/s.txt").write_text("s\n")
    (work / "run.sh").write_text("#!/bin/sh\n")
    (work / "run.sh").chmod(0o775)
    (work / "Dockerfile").write_text("FROM busybox\nCOPY sub/s.txt /from-git-context.txt\n")
    _git("add", ".", cwd=work)
    _git("commit", "-qm", "one", cwd=work)
    _git("tag", "v1", cwd=work)
    commit = _git("rev-parse", "HEAD", cwd=work).strip()
    _git("clone", "-q", "--bare", str(work), str(base / "r.git"), cwd=base)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", f"--base-path={base}", "--export-all",
         "--listen=127.0.0.1", f"--port={port}", str(base)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"git://127.0.0.1:{port}/r.git"
    try:
        for _ in range(100):
            if subprocess.run(["git", "ls-remote", url], capture_output=True).returncode == 0:
                break
            time.sleep(0.05)
        yield url, commit
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


def _step(log: str, text: str) -> str:
    """The plain-progress block of the step whose title contains ``text``."""
    for block in log.split("\n\n"):
        if text in block.splitlines()[0] if block.strip() else False:
            return block.strip()
    raise AssertionError(f"no step {text!r} in:\n{log}")


def test_add_url_is_named_after_the_path_with_mode_0600_and_last_modified(
    dockbuild: DockbuildCLI, tmp_path: Path, web: tuple[str, Path]
) -> None:
    url, root = web
    (root / "dir").mkdir(exist_ok=True)
    (root / "dir/file.txt").write_text("hello http\n")
    os.utime(root / "dir/file.txt", (1400000000, 1400000000))
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM busybox\nADD {url}/dir/file.txt /into/\nADD {url}/dir/file.txt /renamed\n",
    })
    out = tmp_path / "out"
    dockbuild.build(ctx, "-o", f"type=local,dest={out}")
    for path in ("into/file.txt", "renamed"):
        st = os.lstat(out / path)
        assert (out / path).read_text() == "hello http\n"
        assert st.st_mode & 0o7777 == 0o600
        assert st.st_mtime == 1400000000


def test_add_url_unchanged_is_cached_and_a_change_is_seen(
    dockbuild: DockbuildCLI, tmp_path: Path, web: tuple[str, Path]
) -> None:
    url, root = web
    (root / "changing.txt").write_text("v1\n")
    os.utime(root / "changing.txt", (1400000000, 1400000000))
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM busybox\nADD {url}/changing.txt /c.txt\nRUN cat /c.txt\n",
    })
    first = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'o1'}")
    assert "v1" in first.stderr
    again = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'o2'}")
    assert _step(again.stderr, "RUN cat /c.txt").endswith("CACHED")
    (root / "changing.txt").write_text("v2\n")
    os.utime(root / "changing.txt", (1400000100, 1400000100))
    third = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'o3'}")
    assert (tmp_path / "o3/c.txt").read_text() == "v2\n"
    assert "v2" in third.stderr


def test_add_url_checksum_is_verified(dockbuild: DockbuildCLI, tmp_path: Path, web: tuple[str, Path]) -> None:
    import hashlib

    url, root = web
    (root / "sum.txt").write_text("sum\n")
    good = "sha256:" + hashlib.sha256(b"sum\n").hexdigest()
    bad = "sha256:" + "0" * 64
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM busybox\nADD --checksum={good} {url}/sum.txt /\n"})
    dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'out'}")
    assert (tmp_path / "out/sum.txt").read_text() == "sum\n"
    (ctx / "Dockerfile").write_text(f"FROM busybox\nADD --checksum={bad} {url}/sum.txt /\n")
    run = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'bad'}", check=False)
    assert run.returncode == 1
    assert "digest mismatch" in run.stderr and good in run.stderr and "Traceback" not in run.stderr


def test_add_url_missing_is_a_clear_error(dockbuild: DockbuildCLI, tmp_path: Path, web: tuple[str, Path]) -> None:
    url, _ = web
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM busybox\nADD {url}/nope.txt /\n"})
    run = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'out'}", check=False)
    assert run.returncode == 1
    assert "404" in run.stderr and "Traceback" not in run.stderr


def test_copy_refuses_urls(dockbuild: DockbuildCLI, tmp_path: Path, web: tuple[str, Path]) -> None:
    url, _ = web
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM busybox\nCOPY {url}/x /\n"})
    run = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'out'}", check=False)
    assert run.returncode == 1 and "source can't be a URL for COPY" in run.stderr
    assert "Dockerfile:2" in run.stderr


def test_add_git_ref_and_subdir(dockbuild: DockbuildCLI, tmp_path: Path, repo: tuple[str, str]) -> None:
    url, commit = repo
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": (
            "FROM busybox\n"
            f"ADD {url}#v1:sub /sub/\n"
            f"ADD {url} /whole/\n"
            f"ADD --keep-git-dir=true {url}#main /kept/\n"
            f"ADD --checksum={commit[:10]} {url}#v1 /checked/\n"
        ),
    })
    out = tmp_path / "out"
    dockbuild.build(ctx, "-o", f"type=local,dest={out}")
    assert sorted(os.listdir(out / "sub")) == ["s.txt"]
    assert sorted(os.listdir(out / "whole")) == ["Dockerfile", "run.sh", "sub"]
    assert os.lstat(out / "whole/run.sh").st_mode & 0o7777 == 0o755
    assert os.lstat(out / "whole/sub/s.txt").st_mode & 0o7777 == 0o644
    assert os.lstat(out / "whole/sub").st_mode & 0o7777 == 0o755
    assert os.lstat(out / "whole/sub/s.txt").st_mtime > 1600000000  # the checkout time, as BuildKit
    assert (out / "kept/.git").is_dir()
    assert (out / "checked/sub/s.txt").read_text() == "s\n"


def test_add_git_checksum_mismatch_fails(dockbuild: DockbuildCLI, tmp_path: Path, repo: tuple[str, str]) -> None:
    url, _ = repo
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM busybox\nADD --checksum=deadbeef {url}#v1 /g/\n"})
    run = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'out'}", check=False)
    assert run.returncode == 1
    assert "expected checksum to match deadbeef" in run.stderr and "Traceback" not in run.stderr


def test_add_url_auth_token_from_a_secret_never_lands_anywhere(
    dockbuild: DockbuildCLI, tmp_path: Path, web: tuple[str, Path]
) -> None:
    url, root = web
    (root / "private").mkdir(exist_ok=True)
    (root / "private/p.txt").write_text("private\n")
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM busybox\nADD {url}/private/p.txt /p.txt\n"})
    denied = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'no'}", check=False)
    assert denied.returncode == 1 and "401" in denied.stderr
    (tmp_path / "token").write_text(TOKEN)
    out = tmp_path / "out.tar"
    run = dockbuild.build(
        ctx, "--secret", f"id=HTTP_AUTH_TOKEN_127.0.0.1,src={tmp_path / 'token'}",
        "-o", f"type=oci,dest={out}",
    )
    import tarfile

    with tarfile.open(out) as tf:
        blobs = b"".join(tf.extractfile(m).read() for m in tf if m.isfile())  # type: ignore[union-attr]
    import gzip
    import io

    layers = b""
    with tarfile.open(out) as tf:
        for m in tf:
            data = tf.extractfile(m).read() if m.isfile() else b""  # type: ignore[union-attr]
            if data[:2] == b"\x1f\x8b":
                layers += gzip.GzipFile(fileobj=io.BytesIO(data)).read()
    assert b"private\n" in layers
    assert TOKEN.encode() not in blobs + layers
    assert TOKEN not in run.stderr + run.out
    cache = dockbuild.root
    for path in cache.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_add_git_ref_cannot_smuggle_a_git_option(dockbuild: DockbuildCLI, tmp_path: Path, repo: tuple[str, str]) -> None:
    url, _ = repo
    marker = tmp_path / "pwned"
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f'FROM busybox\nADD ["{url}#--upload-pack=touch {marker};:", "/g/"]\n',
    })
    run = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'out'}", check=False)
    assert run.returncode == 1 and "invalid ref" in run.stderr
    assert not marker.exists()
