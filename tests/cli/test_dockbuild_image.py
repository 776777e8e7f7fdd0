"""dockbuild's own image (image/Dockerfile), built by dockbuild and run by the real dockerd.

The image is built once per session on the local Debian base (testdata/make_debian_base.py,
kept in testdata/images/debian like `make image` keeps it) from wheels made here, in both
variants, and loaded into docker. Builds inside it take the busybox layout from a mount.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clitools import DOCKBUILD, REPO, read_oci, require_docker, write_context
from compat_cases import BUILDCTL_CASES, KANIKO_CASES, Case, files
from registry_fixture import Registry, write_docker_config

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (debootstrap, docker)"),
]

DEBIAN = REPO / "testdata" / "images" / "debian"
MAKE_DEBIAN = REPO / "testdata" / "make_debian_base.py"
TAG = f"dockbuild-image-test-{os.getpid()}"
EPOCH = "1700000000"
UNCONFINED = ("--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined")
DOCKERFILE = """\
FROM busybox
COPY a.txt /a.txt
RUN echo built > /built && chown 1000:1000 /built && id -u > /whoami
"""


@dataclass(frozen=True)
class Variant:
    tag: str  # the docker image
    oci: Path  # the OCI tar dockbuild wrote
    digest: str  # its manifest digest


@dataclass(frozen=True)
class Image:
    root: Variant
    rootless: Variant
    wheels: Path


def debian_base() -> Path:
    """The local base, made again only when its maker changed (as `make image` does)."""
    index = DEBIAN / "index.json"
    if index.exists() and index.stat().st_mtime >= MAKE_DEBIAN.stat().st_mtime:
        return DEBIAN
    if shutil.which("debootstrap", path="/usr/sbin:/usr/bin") is None:
        pytest.fail("debootstrap is not installed (Debian package debootstrap); the tests need it")
    done = subprocess.run(
        [sys.executable, str(MAKE_DEBIAN), str(DEBIAN)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(f"make_debian_base.py failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return DEBIAN


def build_image(cache: Path, wheels: Path, target: str, out: Path, *extra: str) -> str:
    """dockbuild builds image/Dockerfile's target to an OCI tar; returns the manifest digest."""
    env = dict(os.environ, DOCKBUILD_ROOT=str(cache), SOURCE_DATE_EPOCH=EPOCH)
    env.pop("DOCKBUILD_DEBUG", None)
    done = subprocess.run(
        [DOCKBUILD, "build", "--progress=plain", "--target", target,
         "--build-arg", f"SOURCE_DATE_EPOCH={EPOCH}", "--build-arg", "BASE=base",
         "--build-context", f"base=oci-layout://{debian_base()}",
         "--build-context", f"wheels={wheels}",
         "-o", f"type=oci,rewrite-timestamp=true,dest={out}", *extra, str(REPO / "image")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return manifest_digest(out)


def manifest_digest(archive: Path) -> str:
    with tarfile.open(archive) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    return str(index["manifests"][0]["digest"])


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    require_docker()
    work = tmp_path_factory.mktemp("image")
    wheels = work / "wheels"
    # A stale build/lib would go into the wheel (setuptools packages whatever it holds).
    shutil.rmtree(REPO / "build" / "lib", ignore_errors=True)
    made = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "-w", str(wheels), str(REPO), "pip"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert made.returncode == 0, f"pip wheel failed:\n{made.stderr}"
    variants = {}
    for target, tag in (("image", f"{TAG}:root"), ("rootless", f"{TAG}:rootless")):
        oci, docker_tar = work / f"{target}.tar", work / f"{target}.docker.tar"
        digest = build_image(
            work / "cache", wheels, target, oci,
            "-t", tag, "-o", f"type=docker,rewrite-timestamp=true,dest={docker_tar}",
        )  # fmt: skip
        subprocess.run(["docker", "load", "-i", str(docker_tar)], check=True, capture_output=True)
        docker_tar.unlink()
        variants[target] = Variant(tag, oci, digest)
    try:
        yield Image(variants["image"], variants["rootless"], wheels)
    finally:
        for variant in variants.values():
            subprocess.run(["docker", "rmi", "-f", variant.tag], capture_output=True, check=False)


@pytest.fixture
def vol(tmp_path: Path, busybox_layout: Path) -> Iterator[Path]:
    """A directory for the container: the busybox layout, a context, room for outputs."""
    path = tmp_path / "vol"
    (path / "ctx").mkdir(parents=True)
    (path / "out").mkdir()
    shutil.copytree(busybox_layout, path / "busybox")
    (path / "ctx" / "Dockerfile").write_text(DOCKERFILE)
    (path / "ctx" / "a.txt").write_text("a\n")
    subprocess.run(["chmod", "-R", "a+rwX", str(path)], check=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)  # files of uid 1000: removed by root here


def docker_run(
    tag: str,
    vol: Path | None,
    *args: str,
    options: tuple[str, ...] = (),
    entrypoint: str | None = None,
) -> subprocess.CompletedProcess[str]:
    command = ["docker", "run", "--rm", *options]
    if vol is not None:
        command += ["-v", f"{vol}:/vol"]
    if entrypoint is not None:
        command += ["--entrypoint", entrypoint]
    return subprocess.run(
        [*command, tag, *args], capture_output=True, text=True, timeout=600, check=False
    )


def skopeo_inspect(reference: str) -> dict:  # type: ignore[type-arg]
    done = subprocess.run(
        ["skopeo", "inspect", "--raw", reference], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _entry(archive: Path, name: str) -> tarfile.TarInfo:
    """The topmost layer's entry for name in an OCI tar."""
    for layer in reversed(read_oci(archive).layers):
        try:
            return layer.getmember(name)
        except KeyError:
            continue
    raise AssertionError(f"{name} is in no layer of {archive}")


def test_image_config_has_the_entry_point_volume_and_user(image: Image) -> None:
    root, rootless = read_oci(image.root.oci).config, read_oci(image.rootless.oci).config
    for config in (root["config"], rootless["config"]):
        assert config["Entrypoint"] == ["dockbuild"]
        assert "DOCKBUILD_ROOT=/var/cache/dockbuild" in config["Env"]
        assert "/var/cache/dockbuild" in config["Volumes"]
    assert root["config"].get("User", "") in ("", "0")
    assert rootless["config"]["User"] == "1000:1000"
    assert root["created"] == "2023-11-14T22:13:20Z"  # SOURCE_DATE_EPOCH


def test_newuidmap_keeps_its_file_capabilities_in_the_layer_and_in_docker(image: Image) -> None:
    for tool in ("newuidmap", "newgidmap"):
        entry = _entry(image.root.oci, f"usr/bin/{tool}")
        assert "SCHILY.xattr.security.capability" in entry.pax_headers
        assert entry.mode & 0o4000 == 0  # file capabilities, not set-user-ID
    shown = docker_run(
        image.rootless.tag, None, "/usr/bin/newuidmap", "/usr/bin/newgidmap",
        entrypoint="/usr/sbin/getcap",
    )  # fmt: skip
    assert "/usr/bin/newuidmap cap_setuid=ep" in shown.stdout, shown.stderr
    assert "/usr/bin/newgidmap cap_setgid=ep" in shown.stdout


def test_image_has_the_tools_and_the_user_with_subordinate_ids(image: Image) -> None:
    script = (
        "id -u && cat /etc/subuid /etc/subgid && git --version && ssh -V 2>&1"
        " && command -v fuse-overlayfs && python3 -c 'import sys; print(sys.version_info >= (3, 11))'"
        " && dockbuild --version"
    )
    done = docker_run(image.rootless.tag, None, "-c", script, entrypoint="/bin/sh")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "1000"
    assert lines[1] == lines[2] == "user:100000:65536"
    assert lines[3].startswith("git version") and "OpenSSH" in lines[4]
    assert lines[5].endswith("fuse-overlayfs") and lines[6] == "True"


def test_image_built_twice_from_empty_caches_has_the_same_digest(
    image: Image, tmp_path: Path
) -> None:
    again = build_image(tmp_path / "cache", image.wheels, "image", tmp_path / "again.tar")
    assert again == image.root.digest


def _build_in_container(tag: str, vol: Path, options: tuple[str, ...]) -> None:
    done = docker_run(
        tag, vol, "build", "--progress=plain",
        "--build-context", "busybox=oci-layout:///vol/busybox",
        "-o", "type=oci,dest=/vol/out/image.tar", "/vol/ctx", options=options,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifest = skopeo_inspect(f"oci-archive:{vol / 'out' / 'image.tar'}")
    assert len(manifest["layers"]) == 3
    built = read_oci(vol / "out" / "image.tar").layers[2].getmember("built")
    assert (built.uid, built.gid) == (1000, 1000)


def test_root_image_builds_in_a_default_container(image: Image, vol: Path) -> None:
    _build_in_container(image.root.tag, vol, ())


def test_rootless_image_builds_in_an_unconfined_container(image: Image, vol: Path) -> None:
    _build_in_container(image.rootless.tag, vol, ("--user", "1000", *UNCONFINED))


# kaniko's and BuildKit's CI command lines (tests/cli/compat_cases.py) through the image's
# /kaniko/executor and buildctl-daemonless.sh, against the session's registries on this
# host's loopback (--network host), each in both modes: the root image in a default
# container (as kaniko's image runs) and the rootless one as uid 1000 in an unconfined
# container (as moby/buildkit:rootless runs). Every pushed image and digest file is
# checked by skopeo.
ENTRY_POINTS = {"kaniko": "/kaniko/executor", "buildctl": "buildctl-daemonless.sh"}


@pytest.fixture(scope="module")
def registries(
    registry: Registry, registry_with_auth: Registry, busybox_layout: Path
) -> dict[str, Registry]:
    """Per front end, a registry holding library/busybox:latest (kaniko's demands auth)."""
    for running in (registry, registry_with_auth):
        running.push_layout(busybox_layout, "library/busybox:latest")
    return {"kaniko": registry_with_auth, "buildctl": registry}


def _skopeo_digest(running: Registry, name: str) -> str:
    creds = ["--creds", f"{running.username}:{running.password}"] if running.username else []
    done = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", *creds, f"docker://{name}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["Digest"])


@pytest.mark.registry
@pytest.mark.parametrize("rootless", [False, True], ids=["root-default", "rootless-unconfined"])
@pytest.mark.parametrize("case", [*KANIKO_CASES, *BUILDCTL_CASES], ids=lambda c: c.name)
def test_ci_command_line_runs_in_the_image(
    case: Case, rootless: bool, image: Image, registries: dict[str, Registry], tmp_path: Path
) -> None:
    running = registries[case.tool]
    vol = tmp_path / "vol"
    write_context(vol / "ctx", files(running.host))
    (vol / "out").mkdir()
    values = {"registry": running.host, "context": "/vol/ctx", "out": "/vol/out"}
    argv = case.argv(**values)
    options: tuple[str, ...] = ("--network", "host")
    if rootless:
        options += ("--user", "1000", *UNCONFINED)
    tag = image.rootless.tag if rootless else image.root.tag
    if case.tool == "kaniko":
        write_docker_config(vol / "docker", running)
        options += ("-v", f"{vol / 'docker'}:/kaniko/.docker:ro")
        if "--digest-file" not in argv:
            argv += ["--digest-file", "/vol/out/digest"]
    elif case.image:
        argv += ["--metadata-file", "/vol/out/metadata.json"]
    subprocess.run(["chmod", "-R", "a+rwX", str(vol)], check=True)
    done = docker_run(tag, vol, *argv, options=options, entrypoint=ENTRY_POINTS[case.tool])
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    out = vol / "out"
    if case.image:
        pushed = _skopeo_digest(running, case.pushed(**values))
        if case.tool == "kaniko":
            assert (out / "digest").read_text() == pushed
        else:
            assert json.loads((out / "metadata.json").read_text())["containerimage.digest"] == pushed
    elif case.tool == "kaniko":  # --no-push --tar-path: the tarball and the digest files
        digest = (out / "digest").read_text()
        assert (out / "image-name").read_text() == f"{running.host}/group/project@{digest}\n"
        assert digest.startswith("sha256:") and len(digest) == 71
        archived = subprocess.run(
            ["skopeo", "inspect", f"docker-archive:{out / 'image.tar'}"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert len(json.loads(archived.stdout)["Layers"]) == 3
    else:  # --output type=local
        assert (out / "rootfs" / "greeting.txt").read_text() == "hello from RUN\n"
        assert (out / "rootfs" / "payload.txt").read_text() == "payload\n"
