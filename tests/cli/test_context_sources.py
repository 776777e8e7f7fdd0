"""Build contexts that are not a directory, through the real CLI: a tar or a Dockerfile
on stdin, an HTTP tarball, a git URL, and the same as named contexts; plus which context
files enter a step's cache key."""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path

from clitools import DockbuildCLI, write_context
from test_add_remote import _step, repo, web  # noqa: F401  (module fixtures)


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
