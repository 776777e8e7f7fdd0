"""RUN mounts at the executor level: overlays with subpaths, secrets, capabilities."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_executor import Output, Rootfs, make_busybox_root

from dockbuild.engine.executor import ExecMount, OverlayRootfs, RunRequest
from dockbuild.engine.executor.namespace import NamespaceExecutor
from dockbuild.engine.executor.runc import RuncExecutor
from dockbuild.errors import ExecutorError

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/bin/busybox").exists(), reason="needs root and /bin/busybox"
)


@pytest.fixture(scope="module")
def lower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_busybox_root(tmp_path_factory.mktemp("lower") / "root")


@pytest.fixture(scope="module", params=["namespace", "runc"])
def executor(request: pytest.FixtureRequest) -> Iterator[NamespaceExecutor | RuncExecutor]:
    if request.param == "runc" and shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    ex = NamespaceExecutor() if request.param == "namespace" else RuncExecutor()
    yield ex
    ex.close()


def run(
    executor: NamespaceExecutor | RuncExecutor, rootfs: OverlayRootfs, script: str, **kw: object
) -> tuple[int, Output]:
    out = Output()
    request = RunRequest(
        args=("/bin/sh", "-c", script), env=("PATH=/bin",), cwd="/", rootfs=rootfs, **kw
    )  # type: ignore[arg-type]
    return executor.run(request, out), out


def test_an_overlay_mount_subpath_cannot_escape_its_source(
    executor: NamespaceExecutor | RuncExecutor, tmp_path: Path, lower: Path
) -> None:
    source = tmp_path / "src"
    (source / "data").mkdir(parents=True)
    (source / "data" / "f").write_text("inside\n")
    (source / "link").symlink_to("/data")  # absolute: must mean the source's /data
    (source / "up").symlink_to("../../../../../../data")  # ".." stops at the source root
    rootfs = Rootfs(tmp_path, lower)
    code, out = run(
        executor, rootfs.overlay(), "cat /m/f; ls /n",
        mounts=(
            ExecMount("/m", "overlay", lowerdirs=(str(source),), subpath="link", readonly=True),
            ExecMount("/n", "overlay", lowerdirs=(str(source),), subpath="up", readonly=True),
        ),
    )  # fmt: skip
    assert code == 0, out.stderr
    assert out.stdout == "inside\nf\n"
    assert rootfs.upper_entries() == []  # the mount points were cleaned


def test_a_rw_overlay_mount_keeps_its_writes_out_of_source_and_rootfs(
    executor: NamespaceExecutor | RuncExecutor, tmp_path: Path, lower: Path
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("original\n")
    scratch = tmp_path / "scratch"
    (scratch / "u").mkdir(parents=True)
    (scratch / "w").mkdir()
    rootfs = Rootfs(tmp_path, lower)
    code, out = run(
        executor, rootfs.overlay(), "echo changed > /m/f && touch /m/new && cat /m/f",
        mounts=(ExecMount("/m", "overlay", lowerdirs=(str(source),), upperdir=str(scratch / "u"),
                          workdir=str(scratch / "w")),),
    )  # fmt: skip
    assert code == 0, out.stderr
    assert out.stdout == "changed\n"
    assert (source / "f").read_text() == "original\n" and not (source / "new").exists()
    assert rootfs.upper_entries() == []


def test_a_large_secret_arrives_whole_with_its_owner_and_mode(
    executor: NamespaceExecutor | RuncExecutor, tmp_path: Path, lower: Path
) -> None:
    data = os.urandom(400 * 1024)  # larger than any message to the executor
    rootfs = Rootfs(tmp_path, lower)
    code, out = run(
        executor, rootfs.overlay(),
        "wc -c < /run/secrets/big; stat -c '%a %u %g' /run/secrets/big; echo x > /run/secrets/big",
        mounts=(ExecMount("/run/secrets/big", "secret", readonly=True, data=data, mode=0o440,
                          uid=1000, gid=50),),
    )  # fmt: skip
    lines = out.stdout.split("\n")
    assert lines[:2] == [str(len(data)), "440 1000 50"], out.stderr
    assert code != 0  # read-only
    assert rootfs.upper_entries() == []  # no /run, no /run/secrets left behind


def test_default_capabilities_and_insecure(
    executor: NamespaceExecutor | RuncExecutor, tmp_path: Path, lower: Path
) -> None:
    rootfs = Rootfs(tmp_path, lower)
    _, out = run(
        executor, rootfs.overlay(), "grep CapEff /proc/self/status; cat /proc/kcore | wc -c"
    )
    assert out.stdout.split()[1] == "00000000a80425fb"
    assert out.stdout.split()[2] == "0"  # masked
    _, out = run(executor, rootfs.overlay(), "grep CapEff /proc/self/status", security="insecure")
    assert int(out.stdout.split()[1], 16) & (1 << 21)  # CAP_SYS_ADMIN


def test_a_missing_subpath_is_a_setup_error(
    executor: NamespaceExecutor | RuncExecutor, tmp_path: Path, lower: Path
) -> None:
    rootfs = Rootfs(tmp_path, lower)
    with pytest.raises(ExecutorError, match="no such file or directory in the mount source"):
        run(
            executor, rootfs.overlay(), "true",
            mounts=(ExecMount("/m", "overlay", lowerdirs=(str(lower),), subpath="nope", readonly=True),),
        )  # fmt: skip


def _mount_options(mounts: str, path: str) -> set[str]:
    """The options of the mount that ``path`` is on, from /proc/mounts output."""
    best = ""
    options = ""
    for line in mounts.splitlines():
        target, opts = line.split()[1], line.split()[3]
        prefix = target.rstrip("/") + "/"
        if (path == target or path.startswith(prefix)) and len(target) >= len(best):
            best, options = target, opts
    return set(options.split(","))


@pytest.mark.parametrize("security", ["sandbox", "insecure"])
@pytest.mark.parametrize("network", ["default", "none"])
def test_proc_sys_and_dev_for_each_security_and_network_mode(
    executor: NamespaceExecutor | RuncExecutor,
    tmp_path: Path,
    lower: Path,
    security: str,
    network: str,
) -> None:
    # The sandbox masks /proc/kcore (a mount over it) and keeps /proc/sys and /sys read-only; insecure
    # does neither; --network=none shows its own /sys/class/net (only lo).
    rootfs = Rootfs(tmp_path, lower)
    code, out = run(
        executor, rootfs.overlay(),
        "cat /proc/mounts; echo ==; ls /sys/class/net;"
        " echo ==; ls /dev; echo ==; echo x > /dev/null && head -c 4 /dev/zero | wc -c",
        security=security, network=network,
    )  # fmt: skip
    assert code == 0, out.stderr
    mounts, net, dev, null = out.stdout.split("==\n")
    sandbox = security == "sandbox"
    assert ("ro" in _mount_options(mounts, "/proc/sys")) == sandbox
    assert ("ro" in _mount_options(mounts, "/sys")) == sandbox
    masked = {line.split()[1] for line in mounts.splitlines()} & {"/proc/kcore", "/proc/keys"}
    assert bool(masked) == sandbox
    if network == "none":
        assert net.split() == ["lo"]
    else:
        assert len(net.split()) > 1
    for name in ("null", "zero", "full", "random", "urandom", "tty", "pts", "shm"):
        assert name in dev.split(), dev
    assert null.strip() == "4"
    assert rootfs.upper_entries() == []
