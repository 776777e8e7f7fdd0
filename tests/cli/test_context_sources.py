"""Build contexts that are not a directory, through the real CLI: a tar or a Dockerfile
on stdin, an HTTP tarball, a git URL, and the same as named contexts; plus which context
files enter a step's cache key."""

from __future__ import annotations

import getpass
import io
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clitools import DockbuildCLI, write_context
from test_add_remote import _git, _step, repo, web  # noqa: F401  (module fixtures)


def _tar_of(ctx: Path, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        tf.add(ctx, arcname=".")
    return buf.getvalue()


def test_context_tar_on_stdin(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM busybox\nCOPY f.txt /f.txt\n",
        "f.txt": "from stdin\n",
    })
    out = tmp_path / "out"
    dockbuild("--progress=plain", *dockbuild.base_context, "-o", f"type=local,dest={out}", "-",
              input=_tar_of(ctx))
    assert (out / "f.txt").read_text() == "from stdin\n"


def test_dockerfile_on_stdin_has_an_empty_context(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dockbuild("--progress=plain", *dockbuild.base_context, "-o", f"type=local,dest={out}", "-",
              input=b"FROM busybox\nRUN echo built > /built\n")
    assert (out / "built").read_text() == "built\n"


def test_unsafe_tar_on_stdin_is_refused(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    run = dockbuild("--progress=plain", *dockbuild.base_context, "-o", f"type=local,dest={tmp_path / 'o'}",
                    "-", input=buf.getvalue(), check=False)
    assert run.returncode == 1
    assert "unsafe archive entry" in run.stderr and "Traceback" not in run.stderr
    assert not list(Path(tempfile.gettempdir()).glob("dockbuild-context-*"))  # cleaned up


def test_context_from_an_http_tarball(dockbuild: DockbuildCLI, tmp_path: Path, web: tuple[str, Path]) -> None:  # noqa: F811
    url, root = web
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM busybox\nCOPY f.txt /f.txt\n",
        "f.txt": "from http\n",
    })
    (root / "ctx.tar.gz").write_bytes(_tar_of(ctx))
    out = tmp_path / "out"
    dockbuild("--progress=plain", *dockbuild.base_context, "-o", f"type=local,dest={out}", f"{url}/ctx.tar.gz")
    assert (out / "f.txt").read_text() == "from http\n"


def test_context_from_a_git_url_and_named_git_context(
    dockbuild: DockbuildCLI, tmp_path: Path, repo: tuple[str, str]  # noqa: F811
) -> None:
    url, _ = repo
    out = tmp_path / "out"
    dockbuild("--progress=plain", *dockbuild.base_context, "-o", f"type=local,dest={out}", f"{url}#v1")
    assert (out / "from-git-context.txt").read_text() == "s\n"
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nCOPY --from=src sub/s.txt /named.txt\n"})
    dockbuild.build(ctx, "--build-context", f"src={url}#main", "-o", f"type=local,dest={tmp_path / 'o2'}")
    assert (tmp_path / "o2/named.txt").read_text() == "s\n"


def test_only_the_files_a_step_copies_enter_its_key(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM busybox\nCOPY used.txt /used.txt\nCOPY dir /dir\n",
        "used.txt": "u\n",
        "unrelated.txt": "1\n",
        "dir/a.txt": "a\n",
    })
    dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'o1'}")
    (ctx / "unrelated.txt").write_text("2\n")
    again = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'o2'}")
    assert _step(again.stderr, "COPY used.txt").endswith("CACHED")
    assert _step(again.stderr, "COPY dir").endswith("CACHED")
    (ctx / "dir/a.txt").write_text("changed\n")
    third = dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'o3'}")
    assert _step(third.stderr, "COPY used.txt").endswith("CACHED")
    assert not _step(third.stderr, "COPY dir").endswith("CACHED")
    assert (tmp_path / "o3/dir/a.txt").read_text() == "changed\n"


def test_a_named_local_context_uses_its_own_dockerignore(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    named = write_context(tmp_path / "named", {
        ".dockerignore": "*.secret\n",
        "keep.txt": "k\n",
        "drop.secret": "s\n",
    })
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nCOPY --from=extra . /n/\n"})
    out = tmp_path / "out"
    dockbuild.build(ctx, "--build-context", f"extra={named}", "-o", f"type=local,dest={out}")
    assert sorted(p.name for p in (out / "n").iterdir()) == [".dockerignore", "keep.txt"]


@pytest.fixture(scope="module")
def ssh_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A git repository served by a real sshd on a free port, readable with a generated
    key held by an ssh-agent: (ssh:// URL, the environment a user would have)."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd):
        pytest.fail("sshd is missing: .ci/install-deps installs openssh-server")
    base = tmp_path_factory.mktemp("ssh")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)], check=True)
    (base / "authorized_keys").write_text((base / "user_key.pub").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (base / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base / 'host_key'}\n"
        f"AuthorizedKeysFile {base / 'authorized_keys'}\nPidFile {base / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nLogLevel ERROR\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    work = base / "work"
    work.mkdir()
    _git("init", "-q", "-b", "main", cwd=work)
    (work / "Dockerfile").write_text("FROM busybox\nCOPY s.txt /from-ssh-context.txt\n")
    (work / "s.txt").write_text("over ssh\n")
    _git("add", ".", cwd=work)
    _git("commit", "-qm", "one", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(base / "r.git"), cwd=base)
    host_key = (base / "host_key.pub").read_text().split()
    (base / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    daemon = subprocess.Popen([sshd, "-D", "-e", "-f", str(base / "sshd_config")], stderr=subprocess.PIPE)
    agent_sock = str(base / "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", agent_sock], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if daemon.poll() is not None:
                pytest.fail(f"sshd did not start: {daemon.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                if os.path.exists(agent_sock):
                    break
            except OSError:
                pass
            time.sleep(0.05)
        env = {
            "SSH_AUTH_SOCK": agent_sock,
            # the user's ssh settings: this server's host key is known, no other config
            "GIT_SSH_COMMAND": f"ssh -F /dev/null -o UserKnownHostsFile={base / 'known_hosts'} -o BatchMode=yes",
        }
        subprocess.run(["ssh-add", "-q", str(base / "user_key")], env=dict(os.environ, **env), check=True)
        yield f"ssh://{getpass.getuser()}@127.0.0.1:{port}{base / 'r.git'}", env
    finally:
        for proc in (daemon, agent):
            proc.terminate()
            proc.wait(timeout=10)


def test_git_over_ssh_as_context_and_in_add(
    dockbuild: DockbuildCLI, tmp_path: Path, ssh_repo: tuple[str, dict[str, str]]
) -> None:
    url, env = ssh_repo
    out = tmp_path / "out"
    dockbuild("--progress=plain", *dockbuild.base_context, "-o", f"type=local,dest={out}", f"{url}#main", env=env)
    assert (out / "from-ssh-context.txt").read_text() == "over ssh\n"
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM busybox\nADD {url}#main /src/\n"})
    dockbuild.build(ctx, "-o", f"type=local,dest={tmp_path / 'o2'}", env=env)
    assert (tmp_path / "o2/src/s.txt").read_text() == "over ssh\n"
    # Without the key in the agent the server refuses: the error says so, no traceback.
    run = dockbuild.build(
        ctx, "--no-cache", "-o", f"type=local,dest={tmp_path / 'o3'}", env={**env, "SSH_AUTH_SOCK": "/nonexistent"}, check=False
    )
    assert run.returncode == 1
    assert "git" in run.stderr and "Permission denied" in run.stderr and "Traceback" not in run.stderr


def test_git_file_times_are_the_checkout_time_or_the_commit_time_on_request(
    dockbuild: DockbuildCLI, tmp_path: Path, repo: tuple[str, str]  # noqa: F811
) -> None:
    # As BuildKit's git.mtime: checkout time by default; the commit time (1600000000 in
    # this repository) with ?mtime=commit, or for every git source when
    # SOURCE_DATE_EPOCH is set, so a build from git can be reproduced.
    url, _ = repo
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM busybox\nADD {url}#v1 /default/\nADD {url}?ref=v1&mtime=commit /commit/\n",
    })
    out = tmp_path / "out"
    dockbuild.build(ctx, "-o", f"type=local,dest={out}")
    assert os.lstat(out / "default/sub/s.txt").st_mtime > 1600000000
    assert os.lstat(out / "commit/sub/s.txt").st_mtime == 1600000000
    assert os.lstat(out / "commit/sub").st_mtime == 1600000000
    dockbuild.build(ctx, "--build-arg", "SOURCE_DATE_EPOCH=1700000000", "-o", f"type=local,dest={tmp_path / 'o2'}")
    assert os.lstat(tmp_path / "o2/default/sub/s.txt").st_mtime == 1600000000
    # A git context: the same rule.
    ctx_out = tmp_path / "o3"
    dockbuild("--progress=plain", *dockbuild.base_context, "-o", f"type=local,dest={ctx_out}", f"{url}?ref=v1&mtime=commit")
    assert os.lstat(ctx_out / "from-git-context.txt").st_mtime == 1600000000
    bad = dockbuild("--progress=plain", *dockbuild.base_context, f"{url}?ref=v1&mtime=never", check=False)
    assert bad.returncode == 1 and "invalid mtime 'never'" in bad.stderr
    assert "internal error" not in bad.stderr and "Traceback" not in bad.stderr
