"""RUN steps of foreign platforms (arm64, arm/v7, riscv64) through binfmt_misc and QEMU user
mode, through the real CLI: with every executor and rootless, listed by `debug info`,
refused before the foreign step starts when the emulator is missing, disabled or lacks the
F flag, and built without one when every foreign step is served from the cache.

The refusals use a binfmt_misc instance of their own (Linux 6.7+: a user namespace that
mounts binfmt_misc gets an empty one, seen by nothing else), so the host's registrations
are never touched. The host's must be there: `make deps` runs .ci/start-binfmt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from clitools import DOCKBUILD, DockbuildCLI, layer_files, read_oci, write_context
from registry_fixture import Registry, require_binary
from test_run_rootless import BuildUser, _context, _give, _make_user, needs

from dockbuild.engine.executor import emulation

# platform -> what `uname -m` says there, and the OCI platform of its image (the target's,
# normalised: arm64's v8 is implied)
UNAME = {"linux/arm64": "aarch64", "linux/arm/v7": "armv7l", "linux/riscv64": "riscv64"}
OCI_PLATFORM = {
    "linux/arm64": ("arm64", None),
    "linux/arm/v7": ("arm", "v7"),
    "linux/riscv64": ("riscv64", None),
}
BINFMT = "/proc/sys/fs/binfmt_misc"
RUN_UNAME = "FROM busybox\nRUN uname -m > /machine && busybox sha256sum /bin/busybox > /sum\n"


@pytest.fixture(scope="module", autouse=True)
def _host_emulators() -> None:
    """The host's qemu entries, registered with F: a missing one fails (not skips) the
    module, as CI registers them (make deps -> .ci/start-binfmt)."""
    require_binary("qemu-aarch64-static", "qemu-user-static")
    entries = {e.name: e for e in emulation.binfmt_entries()}
    for name in ("qemu-aarch64", "qemu-arm", "qemu-riscv64"):
        entry = entries.get(name)
        if entry is None or not entry.enabled or not entry.fix_binary:
            pytest.fail(f"binfmt_misc has no enabled {name} with the F flag: run .ci/start-binfmt")


@pytest.fixture
def multi(tmp_path: Path, busybox_multi_layout: Path) -> DockbuildCLI:
    return DockbuildCLI(tmp_path / "cache", busybox_multi_layout)


@pytest.mark.parametrize("executor", ["namespace", "runc", "chroot"])
@pytest.mark.parametrize("platform", list(UNAME))
def test_a_foreign_run_step_runs_emulated_with_every_executor(
    multi: DockbuildCLI, tmp_path: Path, platform: str, executor: str
) -> None:
    if executor == "runc":
        require_binary("runc", "runc")
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": RUN_UNAME})
    out = tmp_path / "out.tar"
    run = multi.build(ctx, "--platform", platform, "--executor", executor, "-o", f"type=oci,dest={out}")
    image = read_oci(out)
    files = layer_files(image.layers)
    assert files["machine"] == f"{UNAME[platform]}\n".encode()
    assert files["sum"].endswith(b"  /bin/busybox\n")  # a foreign busybox applet ran to the end
    arch, variant = OCI_PLATFORM[platform]
    assert (image.config["architecture"], image.config.get("variant")) == (arch, variant)
    assert "RUN uname -m" in run.stderr


@pytest.fixture(scope="module")
def emulating_user() -> Iterator[BuildUser]:
    yield from _make_user(f"dbem{os.getpid() % 100000}", ranged=True)


@needs
def test_a_rootless_build_runs_foreign_steps_emulated(
    emulating_user: BuildUser, busybox_multi_layout: Path
) -> None:
    layout = _give(emulating_user, busybox_multi_layout, "busybox-multi")
    ctx = _context(emulating_user, "ctx", RUN_UNAME + "RUN id -u > /uid\n")
    out = emulating_user.home / "out.tar"
    info = json.loads(emulating_user.dockbuild("debug", "info").stdout)
    assert info["executor"]["rootless"]["map"] == "subuid"
    emulating_user.dockbuild(
        "--build-context", f"busybox=oci-layout://{layout}", "--platform", "linux/arm64",
        "-o", f"type=oci,dest={out}", str(ctx),
    )  # fmt: skip
    files = layer_files(read_oci(out).layers)
    assert (files["machine"], files["uid"]) == (b"aarch64\n", b"0\n")


def test_debug_info_lists_native_and_emulated_platforms(dockbuild: DockbuildCLI) -> None:
    platforms = json.loads(dockbuild("debug", "info").stdout)["platforms"]
    assert "linux/amd64" in platforms["native"]
    emulated = {e["platform"]: e for e in platforms["emulated"]}
    for platform, name in (("linux/arm64", "qemu-aarch64"), ("linux/arm/v7", "qemu-arm"),
                           ("linux/riscv64", "qemu-riscv64")):  # fmt: skip
        entry = emulated[platform]
        assert entry["binfmt"] == name
        assert "F" in entry["flags"]
        # what the kernel has registered, read here independently
        kernel = Path(BINFMT, name).read_text().splitlines()
        assert f"interpreter {entry['interpreter']}" in kernel
    assert platforms["unavailable"] == []


def _entry_line(name: str, flags: str) -> str:
    """The package's registration line for `name` (qemu-user-static's), with these flags."""
    require_binary(name + "-static", "qemu-user-static")
    line = Path(f"/usr/lib/binfmt.d/{name}.conf").read_text().strip()
    fields = line.split(":")
    fields[7] = flags
    return ":".join(fields)


def _in_own_binfmt(multi: DockbuildCLI, setup: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`dockbuild ARGS` in a user and mount namespace with an empty binfmt_misc of its own,
    after the shell commands `setup` (with $LINE_aarch64 and $LINE_aarch64_noF at hand)."""
    unshare = require_binary("unshare", "util-linux")
    script = f"mount -t binfmt_misc binfmt_misc {BINFMT} || exit 99\n{setup}\nexec \"$@\""
    env = multi.env(
        {
            "LINE_aarch64": _entry_line("qemu-aarch64", "POF"),
            "LINE_aarch64_noF": _entry_line("qemu-aarch64", "PO"),
        }
    )
    done = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", DOCKBUILD,
         "--progress=plain", *multi.base_context, *args],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if done.returncode == 99:
        pytest.skip("this kernel has no binfmt_misc instance per user namespace (Linux 6.7+)")
    return done


def _refused(done: subprocess.CompletedProcess[str], out: Path) -> str:
    """The error of a build refused before its foreign RUN step started, pointing at the
    step's Dockerfile line, with nothing written."""
    assert done.returncode == 1, done.stderr
    # the foreign step never started (a native one beside it may have, and is stopped)
    started = re.findall(r"^#\d+ \[(.*)\] RUN uname", done.stderr, re.MULTILINE)
    assert all(name.startswith("linux/amd64 ") for name in started), started
    assert ">>> RUN uname" in done.stderr  # the step that needs the emulator
    assert "Traceback" not in done.stderr
    assert not out.exists()
    return done.stderr


def test_a_missing_emulator_fails_before_the_foreign_step_naming_it_and_its_package(
    multi: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": RUN_UNAME})
    out = tmp_path / "out.tar"
    done = _in_own_binfmt(multi, ":", "--platform", "linux/amd64,linux/arm64", "-o", f"type=oci,dest={out}", str(ctx))
    err = _refused(done, out)
    assert "RUN steps for linux/arm64 cannot run" in err
    assert "no binfmt_misc emulator is registered for its binaries (qemu-aarch64)" in err
    assert "apt-get install qemu-user-static" in err
    assert "with the F flag" in err


def test_a_disabled_emulator_is_named_with_the_command_that_enables_it(
    multi: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": RUN_UNAME})
    out = tmp_path / "out.tar"
    setup = f'printf %s "$LINE_aarch64" > {BINFMT}/register && echo 0 > {BINFMT}/qemu-aarch64'
    err = _refused(_in_own_binfmt(multi, setup, "--platform", "linux/arm64", "-o", f"type=oci,dest={out}", str(ctx)), out)
    assert "the binfmt_misc entry qemu-aarch64 for its binaries is disabled" in err
    assert f"echo 1 > {BINFMT}/qemu-aarch64" in err


def test_an_emulator_without_the_f_flag_is_refused_and_explained(
    multi: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": RUN_UNAME})
    out = tmp_path / "out.tar"
    setup = f'printf %s "$LINE_aarch64_noF" > {BINFMT}/register'
    err = _refused(_in_own_binfmt(multi, setup, "--platform", "linux/arm64", "-o", f"type=oci,dest={out}", str(ctx)), out)
    assert "qemu-aarch64" in err and "has no F flag" in err
    assert "inside each step's rootfs" in err


def test_the_same_private_binfmt_with_the_f_flag_builds(multi: DockbuildCLI, tmp_path: Path) -> None:
    """The control of the refusals above: their namespace runs the step once the entry
    is there with F (so what they refuse is the entry, not the namespace)."""
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": RUN_UNAME})
    out = tmp_path / "out.tar"
    done = _in_own_binfmt(multi, f'printf %s "$LINE_aarch64" > {BINFMT}/register', "--platform",
                          "linux/arm64", "-o", f"type=oci,dest={out}", str(ctx))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert layer_files(read_oci(out).layers)["machine"] == b"aarch64\n"


def test_a_fully_native_build_needs_no_emulator(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    """Cross-compiling only (RUN in $BUILDPLATFORM stages): no emulator is asked for."""
    ctx = write_context(
        tmp_path / "ctx",
        {"Dockerfile": "FROM --platform=$BUILDPLATFORM busybox AS build\nARG TARGETARCH\n"
                       "RUN echo $TARGETARCH > /arch\nFROM scratch\nCOPY --from=build /arch /\n"},
    )  # fmt: skip
    out = tmp_path / "out.tar"
    done = _in_own_binfmt(DockbuildCLI(dockbuild.root, dockbuild.busybox), ":", "--platform",
                          "linux/arm64", "-o", f"type=oci,dest={out}", str(ctx))  # fmt: skip
    assert done.returncode == 0, done.stderr


# A foreign RUN between two COPY steps: a change to `before` makes it run again, a change
# to `after` leaves it cached.
RUN_BETWEEN = "FROM busybox\nCOPY before /\nRUN uname -m > /machine\nCOPY after /\n"
BOTH = ("--platform", "linux/amd64,linux/arm64")


@pytest.mark.parametrize("cache", ["rebuild", "cache-from"])
def test_a_build_whose_foreign_run_steps_are_all_cached_needs_no_emulator(
    multi: DockbuildCLI, tmp_path: Path, cache: str
) -> None:
    """As BuildKit asks for the emulator only for the steps it runs: a rebuild, or a CI
    runner without QEMU importing the cache (--cache-from), serves the arm64 RUN from the
    cache and builds (its changed COPY runs) where the emulator is missing."""
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": RUN_BETWEEN, "before": "b\n", "after": "1\n"})
    exported = tmp_path / "exported-cache"
    multi.build(ctx, *BOTH, "--cache-to", f"type=local,dest={exported},mode=max",
                "-o", f"type=local,dest={tmp_path / 'first'}")  # fmt: skip  # with the host's emulators
    (ctx / "after").write_text("2\n")
    builder, args = multi, ()
    if cache == "cache-from":  # a runner of its own: an empty cache root
        builder = DockbuildCLI(tmp_path / "runner-cache", multi.busybox)
        args = ("--cache-from", f"type=local,src={exported}")
    out = tmp_path / "out.tar"  # a tar: the namespace maps one id, busybox's files have more
    done = _in_own_binfmt(builder, ":", *BOTH, *args, "-o", f"type=tar,dest={out}", str(ctx))
    assert done.returncode == 0, done.stderr
    (step,) = re.findall(r"^#(\d+) \[linux/arm64 3/4\] RUN uname", done.stderr, re.MULTILINE)
    assert f"\n#{step} CACHED\n" in done.stderr
    with tarfile.open(out) as tar:
        for platform, machine in (("linux_amd64", "x86_64"), ("linux_arm64", "aarch64")):
            assert tar.extractfile(f"{platform}/machine").read() == f"{machine}\n".encode()  # type: ignore[union-attr]
            assert tar.extractfile(f"{platform}/after").read() == b"2\n"  # type: ignore[union-attr]


def test_a_foreign_run_step_that_must_run_again_fails_where_the_emulator_is_missing(
    multi: DockbuildCLI, tmp_path: Path
) -> None:
    """The step's cached result is stale (`before` changed): it must run, so the missing
    emulator is the error, naming the platform, before that step starts."""
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": RUN_BETWEEN, "before": "b\n", "after": "1\n"})
    multi.build(ctx, *BOTH, "-o", f"type=local,dest={tmp_path / 'first'}")
    (ctx / "before").write_text("changed\n")
    out = tmp_path / "out.tar"
    err = _refused(_in_own_binfmt(multi, ":", *BOTH, "-o", f"type=tar,dest={out}", str(ctx)), out)
    assert "RUN steps for linux/arm64 cannot run" in err
    assert "apt-get install qemu-user-static" in err


CROSS_AND_EMULATED = """\
FROM --platform=$BUILDPLATFORM busybox AS build
ARG TARGETARCH
RUN mkdir /out && echo "built for $TARGETARCH on $(uname -m)" > /out/app-$TARGETARCH

FROM busybox
ARG TARGETARCH
COPY --from=build /out/app-$TARGETARCH /app
RUN uname -m > /machine
"""


def _skopeo(*args: str) -> str:
    done = subprocess.run([require_binary("skopeo", "skopeo"), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_two_platform_build_cross_compiles_natively_and_emulates_the_target_stage(
    tmp_path: Path, registry: Registry, busybox_multi_ref: str
) -> None:
    """The issue's build: a native cross-compile stage and an emulated RUN, from the
    four-platform base in the registry; the index read by skopeo and umoci, pushed with
    both platforms, the same digests again with SOURCE_DATE_EPOCH."""
    umoci = require_binary("umoci", "umoci")
    cli = DockbuildCLI(tmp_path / "cache", Path("/nonexistent"))
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": CROSS_AND_EMULATED})
    base = ["--build-context", f"busybox=docker-image://{busybox_multi_ref}"]
    epoch = {"SOURCE_DATE_EPOCH": "1700000000"}
    out = tmp_path / "layout"
    run = cli("--progress=plain", *base, "--platform", "linux/amd64,linux/arm64", "-t", "app:1",
              "-o", f"type=oci,dest={out},tar=false,rewrite-timestamp=true", str(ctx), env=epoch)  # fmt: skip
    assert "[linux/amd64->arm64 build 2/2] RUN mkdir /out" in run.stderr  # native for arm64
    assert "[linux/arm64 stage-1 3/3] RUN uname -m > /machine" in run.stderr  # emulated

    index = json.loads(_skopeo("inspect", "--raw", f"oci:{out}:1"))
    assert [m["platform"] for m in index["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux"},
    ]
    blobs = out / "blobs" / "sha256"
    for entry, machine in zip(index["manifests"], ("x86_64", "aarch64"), strict=True):
        arch = entry["platform"]["architecture"]
        manifest = json.loads((blobs / entry["digest"].split(":")[1]).read_bytes())
        config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_bytes())
        assert config["architecture"] == arch
        assert len(manifest["layers"]) == 3  # busybox, COPY, RUN
        # umoci unpacks each platform's image (one tag per manifest: umoci 0.4 takes one)
        single = tmp_path / f"single-{arch}"
        subprocess.run(["cp", "-a", str(out), str(single)], check=True)
        (single / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
            {**{k: entry[k] for k in ("mediaType", "digest", "size")},
             "annotations": {"org.opencontainers.image.ref.name": "p"}}]}))  # fmt: skip
        bundle = tmp_path / f"bundle-{arch}"
        done = subprocess.run([umoci, "unpack", "--image", f"{single}:p", str(bundle)],
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        rootfs = bundle / "rootfs"
        assert (rootfs / "app").read_text() == f"built for {arch} on x86_64\n"
        assert (rootfs / "machine").read_text() == f"{machine}\n"

    pushed = f"{registry.host}/emulation/app:1"
    cli("--progress=plain", *base, "--platform", "linux/amd64,linux/arm64", "--no-cache",
        "-o", f"type=registry,name={pushed},rewrite-timestamp=true", str(ctx), env=epoch)  # fmt: skip
    remote = json.loads(_skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{pushed}"))
    assert [m["platform"]["architecture"] for m in remote["manifests"]] == ["amd64", "arm64"]
    # every step run again (--no-cache), emulated one included, with the same
    # SOURCE_DATE_EPOCH and rewrite-timestamp: the same manifests
    assert [m["digest"] for m in remote["manifests"]] == [m["digest"] for m in index["manifests"]]
    arm = json.loads(_skopeo("--override-arch", "arm64", "--override-variant", "v8", "inspect",
                             "--tls-verify=false", f"docker://{pushed}"))  # fmt: skip
    assert arm["Architecture"] == "arm64"


@pytest.fixture(scope="module")
def hostfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from test_run_in_docker import hostfs_image

    tag = f"dockbuild-test-emulation:{os.getpid()}"
    try:
        yield hostfs_image(tmp_path_factory.mktemp("hostfs"), tag)
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)


@pytest.mark.docker
def test_a_default_docker_container_runs_foreign_steps_through_the_hosts_emulators(
    hostfs: str, tmp_path: Path, busybox_multi_layout: Path
) -> None:
    """binfmt_misc is not mounted in a container, yet the host's F entries serve it: the
    probe runs a program of the platform instead of reading the entries."""
    from test_run_in_docker import docker_dockbuild

    vol = tmp_path / "vol"
    shutil.copytree(busybox_multi_layout, vol / "busybox")
    write_context(vol / "ctx", {"Dockerfile": RUN_UNAME})
    subprocess.run(["chmod", "-R", "a+rwX", str(vol)], check=True)
    info = json.loads(docker_dockbuild(hostfs, vol, "debug", "info").stdout)["platforms"]
    assert info["binfmt_misc"] == "not mounted here"
    assert {"platform": "linux/arm64", "how": "runs"} in info["emulated"]
    run = docker_dockbuild(hostfs, vol, "--progress=plain", "--platform", "linux/riscv64",
                           "--build-context", "busybox=oci-layout:///vol/busybox",
                           "-o", "type=oci,dest=/vol/out.tar", "/vol/ctx")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert layer_files(read_oci(vol / "out.tar").layers)["machine"] == b"riscv64\n"
