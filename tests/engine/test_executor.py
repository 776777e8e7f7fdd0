"""The executors, with real containers on a busybox rootfs (needs root and /bin/busybox)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockbuild.engine.executor import (
    ExecMount,
    OverlayRootfs,
    PlainRootfs,
    RunRequest,
    parse_extra_host,
)
from dockbuild.engine.executor.choice import choose, get_executor
from dockbuild.engine.executor.chroot import ChrootExecutor
from dockbuild.engine.executor.forkserver.mounts import resolve_in_root
from dockbuild.engine.executor.forkserver.syscalls import SetupError
from dockbuild.engine.executor.forkserver.users import resolve_user
from dockbuild.engine.executor.namespace import NamespaceExecutor
from dockbuild.errors import ExecutorError

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "id", "ls", "hostname", "touch", "mkdir", "rm", "sleep", "ip")
APPLETS += ("ifconfig", "mount", "stat", "true", "kill", "head", "grep", "env", "pwd", "wc")
PASSWD = """\
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
user:x:1000:1000:A User:/home/user:/bin/sh
"""
GROUP = """\
root:x:0:
staff:x:50:user
users:x:100:other,user
user:x:1000:
nogroup:x:65534:
"""

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not BUSYBOX.exists(), reason="needs root and /bin/busybox"
)


def make_busybox_root(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    (root / "etc" / "motd").write_text("hello from the lower layer\n")
    return root


@pytest.fixture(scope="module")
def lower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_busybox_root(tmp_path_factory.mktemp("lower") / "root")


@pytest.fixture(scope="module")
def executor() -> Iterator[NamespaceExecutor]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    ex = NamespaceExecutor()
    yield ex
    ex.close()


class Rootfs:
    """A fresh overlay over the shared busybox lower (plus optional extra layers)."""

    def __init__(self, tmp_path: Path, lower: Path) -> None:
        self.upper = tmp_path / "upper"
        self.work = tmp_path / "work"
        self.upper.mkdir()
        self.work.mkdir()
        self.lowers = [lower]
        self.tmp_path = tmp_path

    def add_layer(self) -> Path:
        layer = self.tmp_path / f"layer{len(self.lowers)}"
        layer.mkdir()
        self.lowers.insert(0, layer)
        return layer

    def overlay(self) -> OverlayRootfs:
        return OverlayRootfs(tuple(map(str, self.lowers)), str(self.upper), str(self.work))

    def upper_entries(self) -> list[str]:
        return sorted(str(p.relative_to(self.upper)) for p in self.upper.rglob("*"))


@pytest.fixture
def rootfs(tmp_path: Path, lower: Path) -> Rootfs:
    return Rootfs(tmp_path, lower)


class Output:
    def __init__(self) -> None:
        self.chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.lock = threading.Lock()

    def __call__(self, stream: str, data: bytes) -> None:
        with self.lock:
            self.chunks[stream].append(data)

    @property
    def stdout(self) -> str:
        return b"".join(self.chunks["stdout"]).decode()

    @property
    def stderr(self) -> str:
        return b"".join(self.chunks["stderr"]).decode()


def sh(
    executor: NamespaceExecutor | ChrootExecutor,
    rootfs: OverlayRootfs | PlainRootfs,
    script: str,
    **kwargs: object,
) -> tuple[int, Output]:
    out = Output()
    request = RunRequest(
        args=("/bin/sh", "-c", script),
        env=kwargs.pop("env", ("PATH=/bin",)),  # type: ignore[arg-type]
        cwd=kwargs.pop("cwd", "/"),  # type: ignore[arg-type]
        rootfs=rootfs,
        **kwargs,  # type: ignore[arg-type]
    )
    return executor.run(request, out), out


pytestmark = needs_root


def test_exit_code_propagates(executor: NamespaceExecutor, rootfs: Rootfs) -> None:
    code, _ = sh(executor, rootfs.overlay(), "exit 7")
    assert code == 7


def test_stdout_and_stderr_arrive_separately(executor: NamespaceExecutor, rootfs: Rootfs) -> None:
    code, out = sh(executor, rootfs.overlay(), "echo to-out; echo to-err >&2; cat /etc/motd")
    assert code == 0
    assert out.stdout == "to-out\nhello from the lower layer\n"
    assert out.stderr == "to-err\n"


def test_killed_by_a_signal_reports_128_plus_signal(
    executor: NamespaceExecutor, rootfs: Rootfs
) -> None:
    # Inside its PID namespace the RUN process is PID 1, which the kernel protects from
    # signals sent from inside (as under runc/BuildKit), so `kill -9 $$` by the process
    # itself does nothing; a child shell killed that way is the shell's 128+9.
    code, _ = sh(executor, rootfs.overlay(), 'sh -c "kill -9 \\$\\$"; exit $?')
    assert code == 137
    # A signal from outside really kills PID 1, and the status says so.
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(sh(executor, rootfs.overlay(), "sleep 100")[0])
    )
    thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        runs = [r for r in list(executor._runs) if r.pidfd is not None]
        if runs:
            signal.pidfd_send_signal(runs[0].pidfd, signal.SIGKILL)
            break
        time.sleep(0.01)
    thread.join(10)
    assert result == [137]


def test_process_is_pid_1_with_its_own_hostname_proc_and_dev(
    executor: NamespaceExecutor, rootfs: Rootfs
) -> None:
    code, out = sh(
        executor,
        rootfs.overlay(),
        "echo pid=$$; hostname; ls /proc/1/status; echo x > /dev/null && echo null-ok;"
        " head -c 16 /dev/urandom | wc -c; ls /dev/pts/ptmx /dev/shm; readlink /dev/fd",
    )
    assert code == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[:6] == [
        "pid=1",
        "buildkitsandbox",
        "/proc/1/status",
        "null-ok",
        "16",
        "/dev/pts/ptmx",
    ]
    assert "/proc/self/fd" in lines


def test_hostname_can_be_chosen(executor: NamespaceExecutor, rootfs: Rootfs) -> None:
    code, out = sh(executor, rootfs.overlay(), "hostname; cat /etc/hosts", hostname="box")
    assert code == 0
    assert out.stdout.startswith("box\n127.0.0.1\tlocalhost box\n")


def test_extra_hosts_appear_in_etc_hosts(executor: NamespaceExecutor, rootfs: Rootfs) -> None:
    code, out = sh(
        executor, rootfs.overlay(), "cat /etc/hosts", extra_hosts=("db:10.0.0.5", "v6:fd00::1")
    )
    assert code == 0
    assert "10.0.0.5\tdb\n" in out.stdout and "fd00::1\tv6\n" in out.stdout


def test_user_by_name_gets_its_ids_groups_and_home(
    executor: NamespaceExecutor, rootfs: Rootfs
) -> None:
    code, out = sh(executor, rootfs.overlay(), "id; echo $HOME", user="user")
    assert code == 0, out.stderr
    assert (
        out.stdout
        == "uid=1000(user) gid=1000(user) groups=50(staff),100(users),1000(user)\n/home/user\n"
    )


def test_user_by_uid_and_gid_needs_no_passwd_entry(
    executor: NamespaceExecutor, rootfs: Rootfs
) -> None:
    code, out = sh(executor, rootfs.overlay(), "id -u; id -g", user="4242:4343")
    assert code == 0, out.stderr
    assert out.stdout == "4242\n4343\n"
    code, out = sh(executor, rootfs.overlay(), "id -u; id -g", user="user:staff")
    assert out.stdout == "1000\n50\n"


def test_unknown_user_is_an_executor_error_naming_it(
    executor: NamespaceExecutor, rootfs: Rootfs
) -> None:
    with pytest.raises(ExecutorError, match="unable to find user ghost: no matching entries"):
        sh(executor, rootfs.overlay(), "true", user="ghost")


def test_missing_working_directory_is_created(executor: NamespaceExecutor, rootfs: Rootfs) -> None:
    code, out = sh(executor, rootfs.overlay(), "pwd", cwd="/app/src")
    assert code == 0
    assert out.stdout == "/app/src\n"
    assert (rootfs.upper / "app" / "src").is_dir()


def test_environment_is_passed_and_path_searched(
    executor: NamespaceExecutor, rootfs: Rootfs
) -> None:
    out = Output()
    request = RunRequest(
        args=("env",), env=("PATH=/bin", "GREETING=hi there"), cwd="/", rootfs=rootfs.overlay()
    )
    assert executor.run(request, out) == 0
    assert "GREETING=hi there\n" in out.stdout
    assert "PATH=/bin\n" in out.stdout


def test_missing_command_exits_127_with_a_message(
    executor: NamespaceExecutor, rootfs: Rootfs
) -> None:
    out = Output()
    request = RunRequest(args=("nosuchcmd",), env=("PATH=/bin",), cwd="/", rootfs=rootfs.overlay())
    assert executor.run(request, out) == 127
    assert 'exec: "nosuchcmd": executable file not found in $PATH' in out.stderr


def test_network_none_has_only_loopback_and_it_is_up(
    executor: NamespaceExecutor, rootfs: Rootfs
) -> None:
    code, out = sh(executor, rootfs.overlay(), "ls /sys/class/net; ip -o link", network="none")
    assert code == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "lo"
    assert len(lines) == 2 and "lo:" in lines[1] and ",UP" in lines[1]


def test_writes_land_in_the_upper_dir_and_deletes_become_whiteouts(
    executor: NamespaceExecutor, rootfs: Rootfs
) -> None:
    code, _ = sh(executor, rootfs.overlay(), "echo new > /etc/newfile; rm /etc/motd")
    assert code == 0
    assert (rootfs.upper / "etc" / "newfile").read_text() == "new\n"
    st = os.lstat(rootfs.upper / "etc" / "motd")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_mount_stubs_do_not_stay_in_the_upper_dir(
    executor: NamespaceExecutor, rootfs: Rootfs, tmp_path: Path
) -> None:
    # The lower has no /proc, /dev, /sys, /etc/hosts, /etc/resolv.conf or /mnt.
    data = tmp_path / "data"
    data.mkdir()
    code, out = sh(
        executor,
        rootfs.overlay(),
        "ls /proc/self /dev/null /sys/class /etc/hosts /etc/resolv.conf /mnt/data >/dev/null",
        mounts=(ExecMount("/mnt/data", "bind", str(data)), ExecMount("/scratch", "tmpfs")),
    )
    assert code == 0, out.stderr
    assert rootfs.upper_entries() == []


def test_mountpoints_provided_below_the_image_never_change_what_the_step_writes(
    executor: NamespaceExecutor, rootfs: Rootfs
) -> None:
    # /etc/hosts and /etc/resolv.conf are missing from the image: the mountpoints come
    # from a layer below it, so a file written into /etc copies up the image's /etc
    # (its mode), and nothing else appears in the upper dir.
    layer = rootfs.add_layer()
    (layer / "etc").mkdir()
    os.chmod(layer / "etc", 0o751)
    code, out = sh(executor, rootfs.overlay(), "cat /etc/hosts >/dev/null && echo x > /etc/new")
    assert code == 0, out.stderr
    assert rootfs.upper_entries() == ["etc", "etc/new"]
    assert stat.S_IMODE((rootfs.upper / "etc").stat().st_mode) == 0o751


def test_etc_files_are_bound_over_existing_ones_without_copies(
    executor: NamespaceExecutor, rootfs: Rootfs
) -> None:
    layer = rootfs.add_layer()
    (layer / "etc").mkdir()
    (layer / "etc" / "hosts").write_text("image hosts\n")
    (layer / "etc" / "resolv.conf").write_text("nameserver 192.0.2.1\n")
    code, out = sh(executor, rootfs.overlay(), "cat /etc/hosts /etc/resolv.conf", network="none")
    assert code == 0
    assert "buildkitsandbox" in out.stdout and "192.0.2.1" not in out.stdout
    assert rootfs.upper_entries() == []


def test_symlinked_mount_targets_stay_inside_the_rootfs(
    executor: NamespaceExecutor, rootfs: Rootfs, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    layer = rootfs.add_layer()
    (layer / "etc").mkdir()
    (layer / "etc" / "resolv.conf").symlink_to(outside / "resolv.conf")
    code, out = sh(executor, rootfs.overlay(), "cat /etc/resolv.conf > /dev/null")
    assert code == 0, out.stderr
    assert list(outside.iterdir()) == []


def test_readonly_bind_mount_refuses_writes(
    executor: NamespaceExecutor, rootfs: Rootfs, tmp_path: Path
) -> None:
    src = tmp_path / "ro"
    src.mkdir()
    (src / "file").write_text("content\n")
    code, out = sh(
        executor,
        rootfs.overlay(),
        "cat /ro/file; touch /ro/other && echo wrote",
        mounts=(ExecMount("/ro", "bind", str(src), readonly=True),),
    )
    assert code != 0
    assert out.stdout == "content\n"
    assert "Read-only file system" in out.stderr
    assert sorted(p.name for p in src.iterdir()) == ["file"]


def test_readwrite_bind_mount_writes_reach_the_host(
    executor: NamespaceExecutor, rootfs: Rootfs, tmp_path: Path
) -> None:
    src = tmp_path / "rw"
    src.mkdir()
    code, _ = sh(
        executor,
        rootfs.overlay(),
        "echo cached > /cache/file",
        mounts=(ExecMount("/cache", "bind", str(src)),),
    )
    assert code == 0
    assert (src / "file").read_text() == "cached\n"


def test_tmpfs_mount_is_writable_and_leaves_nothing(
    executor: NamespaceExecutor, rootfs: Rootfs
) -> None:
    code, out = sh(
        executor,
        rootfs.overlay(),
        "echo x > /tmp/x && mount | grep ' /tmp '",
        mounts=(ExecMount("/tmp", "tmpfs", options=("size=1m", "mode=1777")),),
    )
    assert code == 0, out.stderr
    assert "tmpfs on /tmp type tmpfs" in out.stdout
    assert rootfs.upper_entries() == []


def test_concurrent_runs_both_succeed(
    executor: NamespaceExecutor, tmp_path: Path, lower: Path
) -> None:
    for i in range(4):
        (tmp_path / str(i)).mkdir()
    roots = [Rootfs(tmp_path / str(i), lower) for i in range(4)]
    results: list[tuple[int, str]] = []

    def one(i: int) -> None:
        code, out = sh(executor, roots[i].overlay(), f"sleep 0.2; echo run{i} > /out; cat /out")
        results.append((code, out.stdout))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [(0, f"run{i}\n") for i in range(4)]


def test_close_kills_running_containers_promptly(tmp_path: Path, lower: Path) -> None:
    ex = NamespaceExecutor()
    rootfs = Rootfs(tmp_path, lower)
    outcome: list[object] = []

    def target() -> None:
        try:
            outcome.append(sh(ex, rootfs.overlay(), "echo started; sleep 100")[0])
        except ExecutorError as e:
            outcome.append(e)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 10
    while not any(r.pidfd is not None for r in list(ex._runs)) and time.monotonic() < deadline:
        time.sleep(0.01)
    ex.close()
    thread.join(60)  # a bound for a broken close, not a measure: `sleep 100` is killed
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ExecutorError)
    with pytest.raises(ExecutorError, match="closed"):
        sh(ex, rootfs.overlay(), "true")


def test_no_mounts_are_left_on_the_host(executor: NamespaceExecutor, rootfs: Rootfs) -> None:
    assert sh(executor, rootfs.overlay(), "true")[0] == 0
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert "dockbuild-exec" not in mountinfo
    assert str(rootfs.upper) not in mountinfo
    assert "pytest-of" not in mountinfo


def test_plain_rootfs_runs_in_namespaces_too(executor: NamespaceExecutor, tmp_path: Path) -> None:
    root = make_busybox_root(tmp_path / "plain")
    code, out = sh(executor, PlainRootfs(str(root)), "echo $$ > /pid; ls /")
    assert code == 0
    assert (root / "pid").read_text() == "1\n"
    assert sorted(p.name for p in root.iterdir()) == ["bin", "etc", "pid"]


def test_chroot_executor_runs_a_command_as_a_user(tmp_path: Path) -> None:
    root = make_busybox_root(tmp_path / "plain")
    ex = ChrootExecutor()
    try:
        code, out = sh(ex, PlainRootfs(str(root)), "id; pwd; echo hi > /out; exit 3", cwd="/w")
        assert code == 3
        assert out.stdout == "uid=0(root) gid=0(root) groups=0(root)\n/w\n"
        assert (root / "out").read_text() == "hi\n"
        code, out = sh(ex, PlainRootfs(str(root)), "id -u", user="user")
        assert out.stdout == "1000\n"
        with pytest.raises(ExecutorError, match="plain directory"):
            sh(ex, OverlayRootfs((str(root),), "/u", "/w"), "true")
    finally:
        ex.close()


def test_executor_choice_by_name_and_probe(tmp_path: Path) -> None:
    choice = choose()
    assert (choice.name, choice.mounts, choice.namespaces) == ("namespace", True, True)
    assert choose("chroot").mounts is False and choose("runc").mounts is True
    snapshotters = (choice.info(tmp_path)["snapshotter"], choose("chroot").info(tmp_path)["snapshotter"])
    assert snapshotters == ("overlay", "copy")  # overlay: tmp_path is no overlayfs
    assert get_executor("chroot").name == "chroot"
    if shutil.which("runc"):
        runc = get_executor("runc")
        assert runc.name == "runc"
        runc.close()
    with pytest.raises(ExecutorError, match="unknown executor"):
        get_executor("lxc")
    ex = get_executor()
    try:
        assert ex.name == "namespace"
    finally:
        ex.close()


# -- pure functions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("db:10.0.0.5", "db:10.0.0.5"),
        ("db=10.0.0.5", "db:10.0.0.5"),
        ("v6:fd00::1", "v6:fd00::1"),
        ("v6=fd00::1", "v6:fd00::1"),
        ("v6=[fd00::1]", "v6:fd00::1"),
        ("gw:host-gateway", "gw:host-gateway"),  # resolved by the executor, per network
    ],
)
def test_parse_extra_host_accepts_dockers_forms(value: str, expected: str) -> None:
    assert parse_extra_host(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [("db", "bad format"), (":10.0.0.5", "bad format"), ("db:nohost", "invalid IP address"),
     ("db=10.0.0", "invalid IP address")],
)  # fmt: skip
def test_parse_extra_host_refuses_what_docker_refuses(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_extra_host(value)


@pytest.fixture
def user_db(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "passwd").write_text(PASSWD)
    (tmp_path / "group").write_text(GROUP)
    return str(tmp_path / "passwd"), str(tmp_path / "group")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", (0, 0, [0], "/root")),
        ("root", (0, 0, [0], "/root")),
        ("user", (1000, 1000, [1000, 50, 100], "/home/user")),
        ("1000", (1000, 1000, [1000, 50, 100], "/home/user")),
        ("user:users", (1000, 100, [100], "/home/user")),
        ("user:7", (1000, 7, [7], "/home/user")),
        ("123", (123, 0, [0], "/")),
        ("123:456", (123, 456, [456], "/")),
        ("nobody", (65534, 65534, [65534], "/nonexistent")),
    ],
)
def test_resolve_user(user_db: tuple[str, str], spec: str, expected: tuple) -> None:
    user = resolve_user(spec, *user_db)
    assert (user.uid, user.gid, user.groups, user.home) == expected


def test_resolve_user_unknown_names(user_db: tuple[str, str], tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="unable to find user ghost"):
        resolve_user("ghost", *user_db)
    with pytest.raises(SetupError, match="unable to find group ghosts"):
        resolve_user("user:ghosts", *user_db)
    missing = str(tmp_path / "none")
    assert resolve_user("5", missing, missing).uid == 5


def test_resolve_in_root_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "abs").symlink_to("/run/x")
    (root / "etc" / "rel").symlink_to("../../../../outside")
    assert resolve_in_root(str(root), "/etc/abs") == str(root / "run" / "x")
    assert resolve_in_root(str(root), "/etc/rel") == str(root / "outside")
    assert resolve_in_root(str(root), "/../../etc/./hosts") == str(root / "etc" / "hosts")


def test_setup_failures_are_executor_errors_with_the_reason(
    executor: NamespaceExecutor, rootfs: Rootfs, tmp_path: Path
) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ExecutorError, match=f"bind mount source {missing} does not exist"):
        sh(executor, rootfs.overlay(), "true", mounts=(ExecMount("/m", "bind", str(missing)),))
    assert rootfs.upper_entries() == []
