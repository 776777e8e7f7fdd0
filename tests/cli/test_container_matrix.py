"""One Dockerfile built in every kind of container CI gives us, through the real dockerd.

Modes: a default container as root, an unconfined one as root and as uid 1000 (with
subordinate ids, newuidmap from the host's /usr), and a privileged one; each with the
cache root inside the container (its own overlayfs) and on a volume. Every cell must give
the same image digest. The table of cells and build times is printed at the end of the
run (tests/cli/conftest.py).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clitools import read_oci
from test_run_in_docker import UNCONFINED, docker_dockbuild, hostfs_image

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

EPOCH = "1700000000"
SUBID_PATH = "/opt/bin:/usr/bin:/bin"  # the image's newuidmap with file capabilities first

# Every RUN --mount type (a default container's chroot executor emulates each).
MOUNTS_RUN = (
    "RUN --mount=type=cache,target=/var/cache/m,id=m --mount=type=tmpfs,target=/scratch"
    " --mount=type=secret,id=tok --mount=type=bind,from=base,source=/d,target=/mnt/d"
    " --mount=type=ssh"
    ' sh -c \'test "$(cat /run/secrets/tok)" = s3cret && test -f /mnt/d/keep/k'
    ' && test -S "$SSH_AUTH_SOCK" && touch /var/cache/m/x /scratch/y && echo mounts > /mounts\'\n'
)

DOCKERFILE = f"""\
FROM busybox AS base
RUN mkdir -p /d/opq/sub /d/keep && touch /d/opq/x /d/opq/sub/z /d/gone /d/keep/k

FROM base AS files
COPY --chown=1000:1000 a.txt /files/a.txt
RUN touch /files/b /files/c /files/d && chown 1:1 /files/b && chown 1000:100 /files/c \\
 && chown 65534:65534 /files/d

FROM base
COPY --from=files /files /files
RUN rm -rf /d/opq /d/gone && mkdir /d/opq && touch /d/opq/y
{MOUNTS_RUN}"""


@dataclass(frozen=True)
class Mode:
    name: str
    user: str
    options: tuple[str, ...]
    # A shell command that works in such a container only if this host can give the
    # mode what it needs (docker's --privileged needs every capability in dockerd's
    # bounding set; newuidmap needs set-user-ID binaries to work in containers).
    check: str = "true"


MODES = (
    Mode("default root", "0", ()),
    Mode("unconfined root", "0", UNCONFINED),
    Mode(
        "unconfined uid 1000 + subuids", "1000", (*UNCONFINED, "-e", f"PATH={SUBID_PATH}"),
        "unshare --user --map-users=auto --map-groups=auto true",
    ),  # fmt: skip
    Mode("unconfined root + /dev/fuse", "0", (*UNCONFINED, "--device", "/dev/fuse")),
    Mode("privileged root", "0", ("--privileged",)),
)
CACHES = ("in container", "volume")

# cell -> (image digest, seconds, snapshotter)
RESULTS: dict[str, tuple[str | None, float, str]] = {}


def matrix_lines() -> list[str]:
    """The matrix as table lines (for the terminal summary)."""
    if not RESULTS:
        return []
    lines = [f"{'container':<32}{'cache root':<14}{'snapshotter':<13}{'time':>7}  digest"]
    for cell, (digest, seconds, snapshotter) in RESULTS.items():
        mode, cache = cell.split(" | ")
        if snapshotter == "not here":
            lines.append(f"{mode:<32}{cache:<14}skipped: this host cannot make such a container")
            continue
        lines.append(f"{mode:<32}{cache:<14}{snapshotter:<13}{seconds:>6.1f}s  {(digest or '')[:19]}")
    return lines


@pytest.fixture
def vol(tmp_path: Path, busybox_layout: Path) -> Path:
    path = tmp_path / "vol"
    path.mkdir()
    shutil.copytree(busybox_layout, path / "busybox")
    (path / "ctx").mkdir()
    (path / "ctx" / "a.txt").write_text("a\n")
    (path / "secret").write_text("s3cret")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path / "key")], check=True
    )
    subprocess.run(["chmod", "-R", "a+rwX", str(path)], check=True)
    os.chmod(path / "key", 0o600)
    os.chown(path / "key", 1000, 1000)  # ssh-add refuses a key others can read
    return path


def _check_image(archive: Path) -> None:
    """What the Dockerfile asks for: ids, a whiteout and an opaque directory."""
    entries: dict[str, tuple[int, int]] = {}
    for layer in read_oci(archive).layers[1:]:
        entries.update({m.name: (m.uid, m.gid) for m in layer.getmembers()})
    assert entries["files/a.txt"] == (1000, 1000)
    assert (entries["files/b"], entries["files/c"], entries["files/d"]) == (
        (1, 1), (1000, 100), (65534, 65534),
    )  # fmt: skip
    assert "d/.wh.gone" in entries and "d/opq/.wh..wh..opq" in entries and "d/opq/y" in entries


def _digest(archive: Path) -> str:
    _check_image(archive)
    with tarfile.open(archive) as tar:
        index = json.load(io.BytesIO(tar.extractfile("index.json").read()))  # type: ignore[union-attr]
    (entry,) = index["manifests"]
    return str(entry["digest"])


def _root(cache: str) -> str:
    return "/tmp/cache" if cache == "in container" else "/vol/cache"


def _build(
    image: str, vol: Path, mode: Mode, cache: str, dockerfile: str
) -> subprocess.CompletedProcess[str]:
    (vol / "ctx" / "Dockerfile").write_text(dockerfile)
    (vol / "out.tar").unlink(missing_ok=True)
    return docker_dockbuild(
        image, vol, "build", "--progress=plain", "--build-context",
        "busybox=oci-layout:///vol/busybox", "--secret", "id=tok,src=/vol/secret",
        "--ssh", "default=/vol/key", "-o", "type=oci,rewrite-timestamp=true,dest=/vol/out.tar",
        "/vol/ctx",
        user=mode.user,
        options=(*mode.options, "-e", f"SOURCE_DATE_EPOCH={EPOCH}"),
        cache_root=_root(cache),
    )  # fmt: skip


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tag = f"dockbuild-test-hostfs-subids:{os.getpid()}"
    try:
        yield hostfs_image(tmp_path_factory.mktemp("hostfs"), tag, subids=True)
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_every_container_mode_builds_the_dockerfile(
    image: str,
    vol: Path,
    mode: Mode,
    cache: str,
) -> None:
    can = subprocess.run(
        ["docker", "run", "--rm", "--user", mode.user, *mode.options, "-v", "/usr:/usr:ro",
         image, "/bin/sh", "-c", mode.check],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if can.returncode != 0:
        RESULTS[f"{mode.name} | {cache}"] = (None, 0.0, "not here")
        pytest.skip(f"this host cannot make a {mode.name} container: {can.stderr.strip()[-200:]}")
    started = time.monotonic()
    run = _build(image, vol, mode, cache, DOCKERFILE)
    assert run.returncode == 0, run.stderr
    assert "Invalid argument" not in run.stderr
    digest = _digest(vol / "out.tar")
    seconds = time.monotonic() - started
    info = docker_dockbuild(
        image, vol, "debug", "info", user=mode.user,
        options=mode.options, cache_root=_root(cache),
    )  # fmt: skip
    snapshotter = "?"
    if info.returncode == 0:
        snapshotter = str(json.loads(info.stdout)["executor"].get("snapshotter"))
    RESULTS[f"{mode.name} | {cache}"] = (digest, seconds, snapshotter)


def test_every_cell_gives_the_same_image_digest() -> None:
    if len(RESULTS) < len(MODES) * len(CACHES):
        pytest.skip("runs after the whole matrix")
    # Cells this host cannot make (skipped above) have no digest.
    digests = {cell: digest for cell, (digest, _, _) in RESULTS.items() if digest is not None}
    assert len(set(digests.values())) == 1, digests
