"""RUN's sandbox through the real CLI: network modes, entitlements, capabilities,
stopping a build with Ctrl-C / SIGTERM, and exact layer diffs."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from clitools import DOCKBUILD, DockbuildCLI, layer_files, read_oci, write_context

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="RUN steps need root here")


DEFAULT_CAPS = "00000000a80425fb"  # docker's default capability set
CAP_SYS_ADMIN = 1 << 21


def test_network_none_has_only_loopback_up(
    dockbuild: DockbuildCLI, tmp_path: Path, executor: str
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox\nRUN --network=none ip -o link > /none\n"
            "RUN ip -o link > /default\n"
        },  # fmt: skip
    )
    out = tmp_path / "out.tar"
    dockbuild.build(ctx, "--executor", executor, "-o", f"type=oci,dest={out}")
    files = layer_files(read_oci(out).layers)
    none = files["none"].decode().strip().splitlines()
    assert len(none) == 1 and ": lo:" in none[0] and "UP" in none[0], none
    default = files["default"].decode().strip().splitlines()  # its own lo and veth
    assert len(default) == 2 and ": eth0@" in default[1], default


def test_sandbox_hostname_build_arg_applies_with_every_executor(
    dockbuild: DockbuildCLI, tmp_path: Path, executor: str
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {"Dockerfile": "FROM busybox\nRUN hostname > /h && cat /etc/hosts > /hosts\n"},
    )
    out = tmp_path / "out.tar"
    dockbuild.build(
        ctx, "--executor", executor, "--build-arg", "BUILDKIT_SANDBOX_HOSTNAME=foo",
        "-o", f"type=oci,dest={out}",
    )  # fmt: skip
    files = layer_files(read_oci(out).layers)
    assert files["h"] == b"foo\n"
    assert "127.0.0.1\tlocalhost foo" in files["hosts"].decode()
    assert "etc/hosts" not in files  # the generated file is bound, never in the layer


def test_run_sees_default_signal_dispositions(
    dockbuild: DockbuildCLI, tmp_path: Path, executor: str
) -> None:
    # Python (and the fork server) ignore SIGPIPE, SIGXFSZ and SIGINT; a RUN must not
    # inherit that (`yes | head -1` ends because yes dies of SIGPIPE). Exec form, as
    # busybox sh itself ignores SIGQUIT for its children: cp copies its own status.
    ctx = write_context(
        tmp_path / "ctx",
        {"Dockerfile": 'FROM busybox\nRUN ["cp", "/proc/self/status", "/status"]\n'},
    )
    out = tmp_path / "out.tar"
    dockbuild.build(ctx, "--executor", executor, "-o", f"type=oci,dest={out}")
    status = layer_files(read_oci(out).layers)["status"].decode()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["SigIgn"] == "0000000000000000"
    assert fields["SigBlk"] == "0000000000000000"


def test_network_host_and_insecure_need_their_entitlement(
    dockbuild: DockbuildCLI, tmp_path: Path, executor: str
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox\nRUN --network=host ip -o link | wc -l > /host\n"
            "RUN --security=insecure grep CapEff /proc/self/status > /insecure\n"
            "RUN grep CapEff /proc/self/status > /sandbox\n"
        },  # fmt: skip
    )
    out = tmp_path / "out.tar"
    refused = dockbuild.build(
        ctx, "--executor", executor, "-o", f"type=oci,dest={out}", check=False
    )
    assert refused.returncode == 1
    assert "entitlement network.host is not allowed" in refused.stderr
    assert "--allow network.host" in refused.stderr
    assert "Traceback" not in refused.stderr and "#3" not in refused.stderr  # nothing ran
    refused = dockbuild.build(
        ctx,
        "--executor",
        executor,
        "-o",
        f"type=oci,dest={out}",
        "--allow",
        "network.host",
        check=False,
    )
    assert refused.returncode == 1 and "--allow security.insecure" in refused.stderr
    dockbuild.build(
        ctx,
        "--executor",
        executor,
        "-o",
        f"type=oci,dest={out}",
        "--allow",
        "network.host,security.insecure",
    )
    files = layer_files(read_oci(out).layers)
    assert int(files["host"]) > 1
    assert files["sandbox"].split()[1].decode() == DEFAULT_CAPS
    assert int(files["insecure"].split()[1], 16) & CAP_SYS_ADMIN


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline.replace(b"\0", b" "):
                found.append(int(entry))
    return found


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_build_kills_the_step_and_leaves_no_mounts(
    dockbuild: DockbuildCLI, tmp_path: Path, sig: signal.Signals, executor: str
) -> None:
    seconds = 900 + os.getpid() % 50 + int(sig)  # a marker no other process has
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox\nRUN --mount=type=cache,target=/c --mount=type=tmpfs,target=/t"
            f" echo run-has-st''arted && sleep {seconds}\n"
        },  # fmt: skip
    )
    proc = subprocess.Popen(
        [
            DOCKBUILD,
            "--progress=plain",
            "--executor",
            executor,
            *dockbuild.base_context,
            "-o",
            f"type=oci,dest={tmp_path / 'o.tar'}",
            str(ctx),
        ],
        env=dockbuild.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    started = threading.Event()
    lines: list[bytes] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if b"run-has-started" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(60), b"".join(lines).decode()
        deadline = time.monotonic() + 10
        while not _processes_with(f"sleep {seconds}") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _processes_with(f"sleep {seconds}")
        helpers = _children(proc.pid)
        proc.send_signal(sig)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    assert code != 0
    assert b"interrupted" in b"".join(lines)
    assert b"Traceback" not in b"".join(lines)
    deadline = time.monotonic() + 5
    while _processes_with(f"sleep {seconds}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_with(f"sleep {seconds}")
    assert not [p for p in helpers if Path(f"/proc/{p}").exists()]  # the fork server too
    assert str(dockbuild.root) not in Path("/proc/self/mountinfo").read_text()
    assert not (tmp_path / "o.tar").exists()  # no half-written output


def test_each_run_layer_is_the_exact_diff(
    dockbuild: DockbuildCLI, tmp_path: Path, executor: str
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox\n"
            "RUN mkdir -p /d/opq /d/keep && echo old > /d/opq/old && echo k > /d/keep/k"
            " && echo gone > /d/gone && echo v1 > /d/changed\n"
            "RUN rm /d/gone && rm -rf /d/opq && mkdir /d/opq && echo new > /d/opq/new"
            " && echo v2 > /d/changed && echo h > /d/h1 && ln /d/h1 /d/h2"
            " && ln -s ../d/h1 /d/sym && echo s > /d/suid && chmod 4755 /d/suid"
            " && mknod /d/null c 1 3 && mkfifo /d/fifo"
            " && /t/ld.so --library-path /t/lib /t/bin/setcap cap_net_raw+ep /d/h1\n".replace(
                "RUN rm", "RUN --mount=type=bind,from=tools,target=/t rm"
            ),
        },
    )
    from test_run_mounts import _tools_context

    tools = _tools_context(tmp_path / "tools", ["setcap"])
    out = tmp_path / "out.tar"
    dockbuild.build(
        ctx,
        "--executor",
        executor,
        "-o",
        f"type=oci,dest={out}",
        "--build-context",
        f"tools={tools}",
    )
    layers = read_oci(out).layers
    diff = {m.name: m for m in layers[2].getmembers()}
    assert sorted(diff) == sorted(
        ["d", "d/.wh.gone", "d/changed", "d/opq", "d/opq/.wh..wh..opq", "d/opq/new", "d/h1",
         "d/h2", "d/sym", "d/suid", "d/null", "d/fifo"]
    ), sorted(diff)  # fmt: skip
    assert layers[2].extractfile("d/changed").read() == b"v2\n"  # type: ignore[union-attr]
    assert diff["d/h2"].islnk() and diff["d/h2"].linkname == "d/h1"
    assert diff["d/sym"].issym() and diff["d/sym"].linkname == "../d/h1"
    assert diff["d/suid"].mode & 0o4000
    assert diff["d/null"].ischr() and (diff["d/null"].devmajor, diff["d/null"].devminor) == (1, 3)
    assert diff["d/fifo"].isfifo()
    assert "SCHILY.xattr.security.capability" in diff["d/h1"].pax_headers
