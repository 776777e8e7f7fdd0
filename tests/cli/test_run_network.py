"""RUN steps' networks through the real CLI: the isolated default (NAT out, no host
loopback, ports of their own), --network=host, and nothing left behind, even after kill -9.

Traffic goes only to this machine's loopback or to an "outside" network namespace the
test makes: joined to the host by a veth pair (198.51.100.0/24, a documentation range),
with an HTTP server in it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clitools import DOCKBUILD, REPO, DockbuildCLI, layer_files, read_oci, write_context

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("busybox") is None,
    reason="needs root, ip (iproute2) and busybox",
)

SUFFIX = os.getpid() % 100000
OUTSIDE_IP = "198.51.100.2"
HOST_SIDE_IP = "198.51.100.1"


def _wait_for_port(address: str, port: int, netns: str | None = None) -> None:
    for _ in range(200):
        probe = ["ip", "netns", "exec", netns] if netns else []
        done = subprocess.run(
            [*probe, "busybox", "wget", "-q", "-O", "/dev/null", f"http://{address}:{port}/"],
            capture_output=True, check=False,
        )  # fmt: skip
        if done.returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the test's server on {address}:{port} did not start")


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of an HTTP server in a namespace of the test's own, reached by a route."""
    netns, host_if = f"dbnet-out{SUFFIX}", f"dbo{SUFFIX}h"
    www = tmp_path_factory.mktemp("outside-www")
    (www / "index.html").write_text("")
    (www / "hello").write_text("hello from outside\n")
    setup = [
        ["ip", "netns", "add", netns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns],
        ["ip", "addr", "add", f"{HOST_SIDE_IP}/24", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", netns, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0"],
        ["ip", "-n", netns, "link", "set", "eth0", "up"],
        ["ip", "-n", netns, "link", "set", "lo", "up"],
    ]
    server = None
    try:
        for command in setup:
            subprocess.run(command, check=True, capture_output=True)
        # The replies to the NAT's address come in here and are forwarded to the bridge.
        Path(f"/proc/sys/net/ipv4/conf/{host_if}/forwarding").write_text("1")
        server = subprocess.Popen(
            ["ip", "netns", "exec", netns, "busybox", "httpd", "-f", "-p", "8000", "-h", str(www)]
        )
        _wait_for_port(OUTSIDE_IP, 8000, netns)
        yield OUTSIDE_IP
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


@pytest.fixture(scope="module")
def host_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """An HTTP server on the host's 127.0.0.1 (what a step must not reach by default)."""
    www = tmp_path_factory.mktemp("host-www")
    (www / "index.html").write_text("")
    (www / "secret").write_text("host loopback\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(www)])
    try:
        _wait_for_port("127.0.0.1", port)
        yield port
    finally:
        server.kill()
        server.wait()


def _fetch(url: str, dest: str) -> str:
    """A RUN line: the body of ``url`` in ``dest``, or "refused" when it cannot connect."""
    return f"RUN wget -q -O {dest} {url} || echo refused > {dest}\n"  # (-T: a crash in this busybox)


def _leftovers(pids: tuple[int, ...] = ()) -> list[str]:
    """What builds may leave on the host: the veths of ``pids`` (or of any build that
    ended: a build running beside the test, another suite's, has its own) and named
    namespaces; unless another build is running (it holds network.users), the bridge
    and the rules too."""
    import fcntl

    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    if pids:
        found = [n for n in names if any(n.startswith(f"dbv{pid:x}.") for pid in pids)]
    else:  # the owner's pid is in the name: dbv<pid hex>.<slot hex>
        found = [n for n in names if n.startswith("dbv") and not os.path.exists(f"/proc/{int(n[3:].split('.')[0], 16)}")]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    found += [f"netns {line}" for line in netns.splitlines() if "dockbuild" in line]
    try:
        users = os.open("/run/dockbuild/network.users", os.O_RDONLY)
    except FileNotFoundError:
        users = None
    try:
        if users is not None:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return found  # a build of someone else's uses the bridge now
    try:
        found += [line.split(":")[1].strip() for line in links.splitlines() if ": dockbuild0" in line]
        if shutil.which("nft"):
            ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
            found += [f"nft: {line.strip()}" for line in ruleset.splitlines() if "dockbuild" in line]
        if shutil.which("iptables"):
            for table in ("filter", "nat"):
                rules = subprocess.run(["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True, check=False).stdout
                found += [f"iptables: {line}" for line in rules.splitlines() if "dockbuild" in line]
    finally:
        if users is not None:
            os.close(users)
    return found


def test_a_run_step_reaches_the_outside_through_nat_but_not_the_hosts_loopback(
    dockbuild: DockbuildCLI, tmp_path: Path, outside: str, host_port: int, executor: str
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": (
        "FROM busybox\n"
        + _fetch(f"http://{outside}:8000/hello", "/outside")
        + _fetch(f"http://127.0.0.1:{host_port}/secret", "/loopback")
        + "RUN ip -o link | cut -d: -f2 | tr -d ' ' > /links && cat /etc/resolv.conf > /resolv\n"
    )})  # fmt: skip
    out = tmp_path / "out.tar"
    run = dockbuild.build(ctx, "--executor", executor, "-o", f"type=oci,dest={out}")
    assert "WARNING" not in run.stderr
    files = layer_files(read_oci(out).layers)
    assert files["outside"] == b"hello from outside\n"
    assert files["loopback"] == b"refused\n"
    links = files["links"].decode().split()  # its own lo and veth, none of the host's
    assert len(links) == 2 and links[0] == "lo" and links[1].startswith("eth0@"), links
    assert b"nameserver" in files["resolv"] and b"127.0.0.53" not in files["resolv"]
    assert _leftovers() == []


@pytest.fixture
def without_nft(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has every program of this machine's but nft (one
    directory of links), for the iptables backend."""
    if shutil.which("iptables-restore") is None:
        if os.environ.get("CI"):
            raise AssertionError("iptables is not installed (.ci/install-deps installs it)")
        pytest.skip("iptables is not installed (Debian's iptables package has it)")
    tools = tmp_path / "without-nft"
    tools.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                if name != "nft" and not (tools / name).exists():
                    (tools / name).symlink_to(Path(directory, name))
    return {"PATH": str(tools)}


def test_iptables_masquerades_where_nft_is_missing(
    dockbuild: DockbuildCLI, tmp_path: Path, outside: str, host_port: int, without_nft: dict[str, str]
) -> None:
    env = without_nft
    assert json.loads(dockbuild("debug", "info", env=env).stdout)["network"]["nat"] == "iptables"
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": (
        "FROM busybox\n"
        + _fetch(f"http://{outside}:8000/hello", "/outside")
        + _fetch(f"http://127.0.0.1:{host_port}/secret", "/loopback")
    )})  # fmt: skip
    out = tmp_path / "out.tar"
    run = dockbuild.build(ctx, "-o", f"type=oci,dest={out}", env=env)
    assert "WARNING" not in run.stderr
    files = layer_files(read_oci(out).layers)
    assert files["outside"] == b"hello from outside\n"  # the outside has no route back but the NAT
    assert files["loopback"] == b"refused\n"
    assert _leftovers() == []


def test_network_host_still_reaches_the_hosts_loopback(
    dockbuild: DockbuildCLI, tmp_path: Path, host_port: int, executor: str
) -> None:
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM busybox\n" + _fetch(f"http://127.0.0.1:{host_port}/secret", "/loopback"),
    })  # fmt: skip
    out = tmp_path / "out.tar"
    dockbuild.build(ctx, "--executor", executor, "--network=host", "-o", f"type=oci,dest={out}")
    assert layer_files(read_oci(out).layers)["loopback"] == b"host loopback\n"


def test_config_may_make_the_hosts_network_the_default(
    dockbuild: DockbuildCLI, tmp_path: Path, host_port: int
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[network]\ndefault = "host"\n')
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM busybox\n" + _fetch(f"http://127.0.0.1:{host_port}/secret", "/loopback"),
    })  # fmt: skip
    out = tmp_path / "out.tar"
    env = {"DOCKBUILD_CONFIG": str(config)}
    dockbuild.build(ctx, "-o", f"type=oci,dest={out}", env=env)
    assert layer_files(read_oci(out).layers)["loopback"] == b"host loopback\n"
    info = json.loads(dockbuild("debug", "info", env=env).stdout)
    assert info["network"]["default"] == "host"


def test_debug_info_shows_the_bridge_and_the_nat_backend(dockbuild: DockbuildCLI) -> None:
    info = json.loads(dockbuild("debug", "info").stdout)["network"]
    assert info["mode"] == "bridge" and info["bridge"] == "dockbuild0"
    assert info["nat"] in ("nftables", "iptables") and info["reason"]


def test_the_chroot_executor_warns_that_it_uses_the_hosts_network(
    dockbuild: DockbuildCLI, tmp_path: Path, host_port: int
) -> None:
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": "FROM busybox\n" + _fetch(f"http://127.0.0.1:{host_port}/secret", "/loopback"),
    })  # fmt: skip
    out = tmp_path / "out.tar"
    run = dockbuild.build(ctx, "--executor", "chroot", "-o", f"type=oci,dest={out}")
    assert "host's network (the chroot executor cannot isolate it)" in run.stderr
    assert layer_files(read_oci(out).layers)["loopback"] == b"host loopback\n"


def test_two_concurrent_builds_both_bind_port_8080(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    builds = []
    for name in ("one", "two"):
        # Each step holds 8080 for a while and then reads its own server back.
        ctx = write_context(tmp_path / name, {"Dockerfile": (
            "FROM busybox\n"
            f"RUN mkdir /www && echo {name} > /www/who && busybox httpd -p 8080 -h /www "
            "&& sleep 2 && wget -q -O /served http://127.0.0.1:8080/who\n"
        )})  # fmt: skip
        out = tmp_path / f"{name}.tar"
        command = [DOCKBUILD, "build", "--progress=plain", "--no-cache", *dockbuild.base_context,
                   "-o", f"type=oci,dest={out}", str(ctx)]  # fmt: skip
        builds.append((name, out, subprocess.Popen(command, env=dockbuild.env(), stderr=subprocess.PIPE)))
    for name, out, process in builds:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()
        assert layer_files(read_oci(out).layers)["served"] == f"{name}\n".encode()
    assert _leftovers(tuple(p.pid for _, _, p in builds)) == []


def test_the_last_build_out_removes_the_nat_the_first_made_whatever_its_path(
    dockbuild: DockbuildCLI, tmp_path: Path, without_nft: dict[str, str]
) -> None:
    """Builds share the bridge and its NAT: the one that ends last removes what the one
    that made them recorded, even where its own PATH has no nft."""
    first = write_context(tmp_path / "first", {"Dockerfile": "FROM busybox\nRUN sleep 1\n"})
    last = write_context(tmp_path / "last", {"Dockerfile": "FROM busybox\nRUN sleep 4\n"})
    command = [DOCKBUILD, "build", "--progress=plain", "--no-cache", *dockbuild.base_context,
               "-o", "type=tar,dest=/dev/null"]  # fmt: skip
    making = subprocess.Popen([*command, str(first)], env=dockbuild.env(), stderr=subprocess.PIPE)
    for _ in range(600):  # until the first build has made the bridge and its NAT
        if os.path.exists("/sys/class/net/dockbuild0") or making.poll() is not None:
            break
        time.sleep(0.01)
    ending = subprocess.Popen([*command, str(last)], env=dockbuild.env(without_nft), stderr=subprocess.PIPE)
    for process in (making, ending):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()
        assert b"Traceback" not in err and b"internal error" not in err
    assert _leftovers() == []


def test_a_bridge_left_without_its_nat_gets_it_again(
    dockbuild: DockbuildCLI, tmp_path: Path, outside: str
) -> None:
    """A build killed while it removed the bridge and the NAT (side by side) can leave the
    bridge without the NAT: the next build makes the NAT again, and removes both."""
    subnet = "10.88.0.0/16"
    setup = [
        ["ip", "link", "add", "dockbuild0", "type", "bridge"],
        ["ip", "addr", "add", "10.88.0.1/16", "dev", "dockbuild0"],
        ["ip", "link", "set", "dockbuild0", "up"],
    ]
    assert _leftovers() == []
    for command in setup:
        subprocess.run(command, check=True, capture_output=True)
    Path("/run/dockbuild").mkdir(exist_ok=True)
    Path("/run/dockbuild/network.subnet").write_text(subnet)
    Path("/run/dockbuild/network.nat").unlink(missing_ok=True)
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\n" + _fetch(f"http://{outside}:8000/hello", "/outside")})
    out = tmp_path / "out.tar"
    dockbuild.build(ctx, "-o", f"type=oci,dest={out}")
    assert layer_files(read_oci(out).layers)["outside"] == b"hello from outside\n"
    assert _leftovers() == []


def test_nothing_is_left_after_a_build_killed_mid_run(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN sleep 300\n"})
    process = subprocess.Popen(
        [DOCKBUILD, "build", "--progress=plain", *dockbuild.base_context, "-o", "type=tar,dest=/dev/null", str(ctx)],
        env=dockbuild.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    veth = f"dbv{process.pid:x}."
    try:
        for _ in range(600):  # until the step runs in its own network
            links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
            if veth in links or process.poll() is not None:
                break
            time.sleep(0.05)
        assert veth in links, "the step's veth never appeared"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # The next build sweeps what the dead one left, and removes the bridge when done.
    after = write_context(tmp_path / "after", {"Dockerfile": "FROM busybox\nRUN true\n"})
    dockbuild.build(after, "--no-cache", "-o", "type=tar,dest=/dev/null")
    assert _leftovers((process.pid,)) == []


def _tun_usable_by_users() -> bool:
    try:
        return os.stat("/dev/net/tun").st_mode & 0o006 == 0o006
    except OSError:
        return False


@pytest.fixture(scope="module")
def rootless_user() -> Iterator[object]:
    from test_run_rootless import _make_user

    if not _tun_usable_by_users():
        if os.environ.get("CI"):
            raise AssertionError("/dev/net/tun is not usable by users (.ci/install-deps fixes it)")
        pytest.skip("/dev/net/tun is not usable by users (Debian's default mode 0666 fixes it)")
    yield from _make_user(f"dbnw{SUFFIX}", ranged=True)


def _rootless_build(user: Any, busybox_layout: Path, outside: str, host_port: int, tool: str,
                    path: str | None = None) -> tuple[dict[str, bytes], str]:
    """A build as ``user`` (PATH ``path``, for a machine with only pasta); its files and stderr."""
    from test_run_rootless import SITE, _give, _system_python

    layout = user.home / "busybox"
    if not layout.exists():
        _give(user, busybox_layout, "busybox")
    ctx = user.home / f"ctx-{tool}"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        "FROM busybox\n"
        + _fetch(f"http://{outside}:8000/hello", "/outside")
        + _fetch(f"http://127.0.0.1:{host_port}/secret", "/loopback")
        + (_fetch(f"http://10.0.2.2:{host_port}/secret", "/gateway") if tool == "slirp4netns" else "")
        + "RUN ip -o link | cut -d: -f2 | tr -d ' ' > /links\n"
    )
    subprocess.run(["chown", "-R", str(user.uid), str(ctx)], check=True)
    out = user.home / f"out-{tool}.tar"
    env = {"PATH": path or "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(user.home),
           "DOCKBUILD_ROOT": str(user.home / "cache"), "PYTHONPATH": f"{REPO}:{SITE}"}  # fmt: skip
    command = ["-m", "dockbuild", "build", "--progress=plain", "--build-context",
               f"busybox=oci-layout://{layout}", "-o", f"type=oci,dest={out}", str(ctx)]  # fmt: skip
    done = subprocess.run([shutil.which("runuser") or "runuser", "-u", user.name, "--", _system_python(), *command],
                          env=env, cwd=user.home, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    leftover = subprocess.run(["pgrep", "-u", str(user.uid), "-f", "slirp4netns|pasta"],
                              capture_output=True, text=True, check=False).stdout  # fmt: skip
    assert leftover == ""  # the tool ended with the build
    return layer_files(read_oci(out).layers), done.stderr


def test_a_rootless_build_reaches_the_outside_by_slirp4netns_but_not_the_hosts_loopback(
    rootless_user: Any, busybox_layout: Path, outside: str, host_port: int
) -> None:
    if shutil.which("slirp4netns") is None:
        pytest.skip("slirp4netns is not installed (.ci/install-deps installs it)")
    files, stderr = _rootless_build(rootless_user, busybox_layout, outside, host_port, "slirp4netns")
    assert "WARNING" not in stderr
    assert files["outside"] == b"hello from outside\n"
    assert files["loopback"] == b"refused\n"
    assert files["gateway"] == b"refused\n"  # slirp's way to the host's loopback is shut
    assert files["links"].decode().split() == ["lo", "tap0"]  # a network of its own
    info = json.loads(rootless_user.dockbuild("debug", "info").stdout)["network"]
    assert info["mode"] == "rootless" and info["tool"] == "slirp4netns"


def test_a_rootless_build_uses_pasta_where_slirp4netns_is_missing(
    rootless_user: Any, busybox_layout: Path, outside: str, host_port: int
) -> None:
    if shutil.which("pasta") is None:
        pytest.skip("pasta is not installed (.ci/install-deps installs passt)")
    only = rootless_user.home / "pasta-bin"  # a PATH with what a rootless build runs, and pasta
    only.mkdir()
    for name in ("unshare", "newuidmap", "newgidmap", "pasta", "setpriv", "true"):
        found = shutil.which(name)
        assert found is not None, name
        (only / name).symlink_to(found)
    files, stderr = _rootless_build(rootless_user, busybox_layout, outside, host_port, "pasta", str(only))
    assert "WARNING" not in stderr
    assert files["outside"] == b"hello from outside\n"
    assert files["loopback"] == b"refused\n"
    assert files["links"].decode().split() == ["lo", "eth0"]  # pasta's copy of the host's
