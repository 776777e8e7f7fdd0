"""dockbuild inside docker containers, against the real dockerd.

The container image is empty apart from a passwd file: the host's /usr (Python 3.11,
util-linux) and this checkout are mounted read-only, and the cache root is a volume
(test_container_matrix.py also puts it on the container's own overlayfs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from clitools import REPO, read_oci, require_docker

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

IMAGE = f"dockbuild-test-hostfs:{os.getpid()}"
UNCONFINED = ("--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined")
SITE = (
    Path(sys.executable).parents[1]
    / "lib"
    / f"python{sys.version_info.major}.{sys.version_info.minor}"
    / "site-packages"
)
DOCKERFILE = """\
FROM busybox
RUN touch /a /b && chown 1000:1000 /a && chown 65534:65534 /b \\
 && mkdir -p /d/opq && touch /d/opq/x /d/gone && id -u > /whoami
RUN rm -rf /d/opq /d/gone && mkdir /d/opq && touch /d/opq/y
"""


def hostfs_image(root: Path, tag: str, subids: bool = False) -> str:
    """An image of nothing but a passwd file (and, with ``subids``, subordinate ids for
    the user ``builder``, 1000, and /opt/bin/newuidmap): the rest is mounted from the host."""
    require_docker()
    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not Path(python).exists():
        pytest.skip(f"no {python} to run inside the container")
    for d in ("etc", "tmp", "usr", "proc", "sys", "dev", "work", "vol", "home/builder"):
        (root / d).mkdir(parents=True)
    os.chmod(root / "tmp", 0o1777)
    for link in ("bin", "sbin", "lib", "lib64"):
        (root / link).symlink_to(f"usr/{link}")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000::/home/builder:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nbuilder:x:1000:\n")
    if subids:
        for name in ("subuid", "subgid"):
            (root / "etc" / name).write_text("builder:100000:65536\n")
        # newuidmap/newgidmap with file capabilities, as BuildKit's rootless image has
        # them: a set-user-ID binary cannot map ids in a container (docs/run.md).
        (root / "opt" / "bin").mkdir(parents=True)
        for tool, cap in (("newuidmap", "cap_setuid=ep"), ("newgidmap", "cap_setgid=ep")):
            path = root / "opt" / "bin" / tool
            shutil.copyfile(f"/usr/bin/{tool}", path)
            os.chmod(path, 0o755)
            subprocess.run(["setcap", cap, str(path)], check=True)
    tar = subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=security.capability", "-C", str(root), "-c", "."],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    subprocess.run(["docker", "import", "-", tag], input=tar, capture_output=True, check=True)
    return tag


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        yield hostfs_image(tmp_path_factory.mktemp("hostfs"), IMAGE)
    finally:
        subprocess.run(["docker", "rmi", "-f", IMAGE], capture_output=True, check=False)


@pytest.fixture
def vol(tmp_path: Path, busybox_layout: Path) -> Iterator[Path]:
    path = tmp_path / "vol"
    path.mkdir()
    shutil.copytree(busybox_layout, path / "busybox")
    (path / "ctx").mkdir()
    (path / "ctx" / "Dockerfile").write_text(DOCKERFILE)
    subprocess.run(["chmod", "-R", "a+rwX", str(path)], check=True)
    yield path
    # Files of other ids made in the container: removed by root here.
    shutil.rmtree(path, ignore_errors=True)


def docker_dockbuild(
    image: str,
    vol: Path,
    *args: str,
    user: str = "0",
    options: tuple[str, ...] = (),
    cache_root: str = "/vol/cache",
) -> subprocess.CompletedProcess[str]:
    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    return subprocess.run(
        ["docker", "run", "--rm", "--user", user, *options,
         "-v", "/usr:/usr:ro", "-v", f"{REPO}:{REPO}:ro", "-v", f"{SITE}:{SITE}:ro", "-v", f"{vol}:/vol",
         "-e", f"PYTHONPATH={REPO}:{SITE}", "-e", f"DOCKBUILD_ROOT={cache_root}", "-e", "HOME=/tmp",
         "-w", "/tmp", image, python, "-m", "dockbuild", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def layers(archive: Path, skip: int = 1) -> list[dict[str, tuple[int, int]]]:
    """The layers' entries (name -> uid, gid), without the first ``skip`` (the base)."""
    return [{m.name: (m.uid, m.gid) for m in t.getmembers()} for t in read_oci(archive).layers[skip:]]


BUILD = (
    "--progress=plain",
    "--build-context",
    "busybox=oci-layout:///vol/busybox",
    "-o",
    "type=oci,dest=/vol/out.tar",
    "/vol/ctx",
)


def _check_image(vol: Path) -> None:
    first, second = layers(vol / "out.tar")
    assert first["a"] == (1000, 1000) and first["b"] == (65534, 65534)
    assert "d/.wh.gone" in second and "d/opq/y" in second
    assert "d/opq/.wh.x" in second or "d/opq/.wh..wh..opq" in second


def test_root_in_an_unconfined_container_builds_in_a_sandbox(image: str, vol: Path) -> None:
    info = docker_dockbuild(image, vol, "debug", "info", options=UNCONFINED)
    chosen = json.loads(info.stdout)["executor"]
    assert (chosen["executor"], chosen["snapshotter"]) == ("namespace", "overlay"), info.stdout
    run = docker_dockbuild(image, vol, *BUILD, options=UNCONFINED)
    assert run.returncode == 0, run.stderr
    assert "bare chroot" not in run.stderr
    _check_image(vol)


def test_root_in_a_default_container_falls_back_to_chroot_with_a_warning(
    image: str, vol: Path
) -> None:
    info = docker_dockbuild(image, vol, "debug", "info")
    chosen = json.loads(info.stdout)["executor"]
    assert (chosen["executor"], chosen["mounts"], chosen["snapshotter"]) == ("chroot", False, "copy")
    run = docker_dockbuild(image, vol, *BUILD)
    assert run.returncode == 0, run.stderr
    assert "bare chroot without any sandbox" in run.stderr
    assert "--security-opt seccomp=unconfined" in run.stderr
    assert "RUN steps use the host's network" in run.stderr  # no isolation without namespaces
    _check_image(vol)


def test_every_run_mount_type_works_in_a_default_container(image: str, vol: Path) -> None:
    # A default container forbids mount(2) (no CAP_SYS_ADMIN, seccomp): the chroot
    # fallback emulates each RUN mount with copies, and none of it reaches the image.
    secret = "dockbuild-planted-secret-" + os.urandom(8).hex()
    (vol / "tok").write_text(secret)
    (vol / "ctx" / "hello.txt").write_text("hello\n")
    ssh = shutil.which("ssh-keygen") is not None and shutil.which("ssh-agent") is not None
    ssh_args: tuple[str, ...] = ()
    ssh_run = "RUN true\n"
    if ssh:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(vol / "key")], check=True
        )
        os.chmod(vol / "key", 0o600)
        ssh_args = ("--ssh", "default=/vol/key")
        ssh_run = "RUN --mount=type=ssh test -S $SSH_AUTH_SOCK && echo $SSH_AUTH_SOCK > /ssh\n"
    (vol / "ctx" / "Dockerfile").write_text(
        "FROM busybox\n"
        "RUN --mount=type=cache,target=/var/cache/x echo one > /var/cache/x/f\n"
        "RUN --mount=type=cache,target=/var/cache/x cat /var/cache/x/f > /cache\n"
        "RUN --mount=type=bind,target=/ctx,rw cat /ctx/hello.txt > /bind && touch /ctx/new\n"
        "RUN --mount=type=tmpfs,target=/scratch touch /scratch/x && ls /scratch > /tmpfs\n"
        "RUN --mount=type=secret,id=tok test -s /run/secrets/tok && echo yes > /secret\n"
        + ssh_run
    )
    run = docker_dockbuild(
        image, vol, "--secret", "id=tok,src=/vol/tok", *ssh_args, *BUILD
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    files = {}
    names = []
    for layer in read_oci(vol / "out.tar").layers[1:]:
        for m in layer.getmembers():
            names.append(m.name)
            if m.isfile():
                files[m.name] = layer.extractfile(m).read()  # type: ignore[union-attr]
    assert files["cache"] == b"one\n" and files["bind"] == b"hello\n"
    assert files["tmpfs"] == b"x\n" and files["secret"] == b"yes\n"
    if ssh:
        assert files["ssh"] == b"/run/buildkit/ssh_agent.0\n"
    assert not any(n.startswith(("var/cache", "ctx", "scratch", "run")) for n in names), names
    needle = secret.encode()
    for path in (vol / "cache").rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert needle not in path.read_bytes(), path
    assert not any(needle in blob for blob in read_oci(vol / "out.tar").raw)


def test_a_user_in_an_unconfined_container_builds_with_one_id(image: str, vol: Path) -> None:
    shutil.copy2("/bin/busybox", vol / "busybox-bin")
    (vol / "ctx" / "Dockerfile").write_text(
        "FROM scratch\n"
        "RUN --mount=from=tools,source=busybox-bin,target=/busybox"
        ' ["/busybox", "sh", "-c", "/busybox id -u > /whoami"]\n'
    )
    run = docker_dockbuild(
        image, vol, "--progress=plain", "--build-context", "tools=/vol", "-o",
        "type=oci,dest=/vol/out.tar", "/vol/ctx", user="1000", options=UNCONFINED,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "single-ID mapping" in run.stderr
    (layer,) = layers(vol / "out.tar", skip=0)
    assert "whoami" in layer


def test_a_user_in_a_default_container_gets_an_error_naming_the_flags(
    image: str, vol: Path
) -> None:
    run = docker_dockbuild(image, vol, *BUILD, user="1000")
    assert run.returncode == 1
    assert "no way to run RUN steps here" in run.stderr
    # The smallest changes that work: root, or unconfined profiles (docker and Kubernetes).
    assert "run the container as root" in run.stderr
    assert "securityContext.runAsUser: 0" in run.stderr
    assert "--security-opt seccomp=unconfined --security-opt apparmor=unconfined" in run.stderr
    assert "securityContext.seccompProfile.type: Unconfined" in run.stderr
    assert "securityContext.appArmorProfile.type: Unconfined" in run.stderr
    assert "Traceback" not in run.stderr

