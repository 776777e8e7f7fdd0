"""--add-host and --shm-size through the real CLI: /etc/hosts lines and /dev/shm's size
in RUN steps, with every executor, and their place in the cache key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from clitools import DockbuildCLI, layer_files, read_oci, write_context

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="RUN steps need root here")


def _cached(stderr: str, name: str) -> bool:
    """Whether plain progress shows the step whose name contains ``name`` as CACHED."""
    (number,) = {
        line.partition(" ")[0] for line in stderr.splitlines() if line.startswith("#") and name in line
    }
    return f"{number} CACHED" in stderr.splitlines()


def test_add_host_lines_reach_etc_hosts_in_run(
    dockbuild: DockbuildCLI, tmp_path: Path, executor: str
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {"Dockerfile": "FROM busybox\nRUN grep myhost /etc/hosts > /found && cat /etc/hosts > /hosts\n"},
    )
    out = tmp_path / "out.tar"
    dockbuild.build(
        ctx, "--executor", executor, "--add-host", "myhost:10.1.2.3",
        "--add-host", "other=fd00::7", "--add-host", "v6:[fd00::8]",
        "-o", f"type=oci,dest={out}",
    )  # fmt: skip
    files = layer_files(read_oci(out).layers)
    assert files["found"] == b"10.1.2.3\tmyhost\n"
    hosts = files["hosts"].decode().splitlines()
    assert "fd00::7\tother" in hosts and "fd00::8\tv6" in hosts
    assert "etc/hosts" not in files  # bound for the run, never in the layer


def test_add_host_gateway_names_the_host_as_the_steps_network_reaches_it(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    # The isolated default: the step's gateway (the host's end of the bridge), as docker's
    # bridge gateway; on the host's network: its loopback.
    dockerfile = "FROM busybox\nRUN grep gw /etc/hosts > /gw && ip route > /route\n"
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": dockerfile})
    out = tmp_path / "out.tar"
    dockbuild.build(ctx, "--add-host", "gw:host-gateway", "-o", f"type=oci,dest={out}")
    files = layer_files(read_oci(out).layers)
    route = next(line for line in files["route"].decode().splitlines() if line.startswith("default"))
    gateway = route.split()[2]  # "default via 10.88.0.1 dev eth0"
    assert files["gw"] == f"{gateway}\tgw\n".encode()
    assert not gateway.startswith("127.")
    dockbuild.build(
        ctx, "--add-host", "gw:host-gateway", "--network=host", "--allow", "network.host",
        "-o", f"type=oci,dest={out}",
    )  # fmt: skip
    assert layer_files(read_oci(out).layers)["gw"] == b"127.0.0.1\tgw\n"


def test_a_different_add_host_misses_the_cache(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN cat /etc/hosts > /h\n"})
    first = dockbuild.build(ctx, "--add-host", "db:10.0.0.1")
    assert not _cached(first.stderr, "RUN cat /etc/hosts")
    same = dockbuild.build(ctx, "--add-host", "db=10.0.0.1")  # the same entry, docker's other form
    assert _cached(same.stderr, "RUN cat /etc/hosts")
    other = dockbuild.build(ctx, "--add-host", "db:10.0.0.2")
    assert not _cached(other.stderr, "RUN cat /etc/hosts")
    # No --add-host: the key it always had, so the first build's cache is not the one hit.
    plain = dockbuild.build(ctx)
    assert not _cached(plain.stderr, "RUN cat /etc/hosts")


def test_bad_add_host_is_a_usage_error(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN true\n"})
    for value, message in (("nohost", "bad format for add-host"), ("h:999.1.1.1", "invalid IP address")):
        run = dockbuild.build(ctx, "--add-host", value, check=False)
        assert run.returncode == 2, run.stderr
        assert message in run.stderr and "Traceback" not in run.stderr


def _shm_size_kib(proc_mounts: str) -> int:
    for line in proc_mounts.splitlines():
        fields = line.split()
        if fields[1] == "/dev/shm":
            options = dict(o.partition("=")[::2] for o in fields[3].split(","))
            size = options["size"]
            assert size.endswith("k"), line
            return int(size[:-1])
    raise AssertionError(f"no /dev/shm in:\n{proc_mounts}")


def test_shm_size_sets_dev_shm_and_defaults_to_64m(
    dockbuild: DockbuildCLI, tmp_path: Path, executor: str
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {"Dockerfile": "FROM busybox\nRUN cat /proc/mounts > /mounts && df -k /dev/shm > /df\n"},
    )
    out = tmp_path / "out.tar"
    dockbuild.build(ctx, "--executor", executor, "--shm-size", "128m", "-o", f"type=oci,dest={out}")
    files = layer_files(read_oci(out).layers)
    assert _shm_size_kib(files["mounts"].decode()) == 128 * 1024
    assert files["df"].decode().splitlines()[1].split()[1] == str(128 * 1024)
    dockbuild.build(ctx, "--executor", executor, "-o", f"type=oci,dest={out}")
    assert _shm_size_kib(layer_files(read_oci(out).layers)["mounts"].decode()) == 64 * 1024


def test_shm_size_enters_the_cache_key(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN df -k /dev/shm > /df\n"})
    dockbuild.build(ctx, "--shm-size", "1g")
    assert _cached(dockbuild.build(ctx, "--shm-size", "1024m").stderr, "RUN df")
    assert not _cached(dockbuild.build(ctx, "--shm-size", "2g").stderr, "RUN df")


def test_bad_shm_size_is_a_usage_error(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN true\n"})
    run = dockbuild.build(ctx, "--shm-size", "lots", check=False)
    assert run.returncode == 2 and "invalid shm-size" in run.stderr, run.stderr


def test_chroot_executor_refuses_add_host_and_shm_size_clearly(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN true\n"})
    for flag, value in (("--add-host", "h:10.0.0.1"), ("--shm-size", "128m")):
        run = dockbuild.build(ctx, "--executor", "chroot", flag, value, check=False)
        assert run.returncode == 1, run.stderr
        assert f"{flag} cannot work with the chroot executor" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
