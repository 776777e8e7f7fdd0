"""Rootless builds through the real CLI, run as unprivileged users these tests create.

One user has a subuid/subgid range (the normal case): its builds behave as root's do,
files chowned to 1000 and 65534 keep those ids in the image. The other has none: the
build runs with a single-ID mapping and says so.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clitools import REPO, DockbuildCLI, layer_files, read_oci

needs = pytest.mark.skipif(
    os.geteuid() != 0
    or shutil.which("useradd") is None
    or shutil.which("newuidmap") is None
    or shutil.which("unshare") is None,
    reason="needs root (to create the test users), useradd, newuidmap and unshare",
)
pytestmark = needs

SITE = (
    Path(sys.executable).parents[1]
    / "lib"
    / f"python{sys.version_info.major}.{sys.version_info.minor}"
    / "site-packages"
)


@dataclass
class BuildUser:
    name: str
    uid: int
    home: Path  # a directory the user owns, for contexts, caches and outputs

    def dockbuild(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The real command as this user. The venv's interpreter lives under /root, so
        the user runs the same package with the system Python 3.11 and the venv's site."""
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(self.home),
            "DOCKBUILD_ROOT": str(self.home / "cache"),
            "PYTHONPATH": f"{REPO}:{SITE}",
        }
        done = subprocess.run(
            ["runuser", "-u", self.name, "--", _system_python(), "-m", "dockbuild", *args],
            env=env, cwd=self.home, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(
                f"dockbuild {' '.join(args)} as {self.name} failed:\n{done.stderr}"
            )
        return done


def _system_python() -> str:
    """A Python of the venv's version that any user may run (not the one under /root)."""
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return shutil.which(name, path="/usr/local/bin:/usr/bin") or "/usr/bin/python3"


def _python_is_usable() -> None:
    python = _system_python()
    version = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=False).stdout  # fmt: skip
    if version.strip() != str(sys.version_info[:2]):
        pytest.skip("no system Python of the venv's version for the test user")


def _subids(name: str, path: str) -> list[str]:
    """The user's ranges in /etc/subuid or /etc/subgid, as usermod spells them (a-b)."""
    out = []
    for line in Path(path).read_text().splitlines():
        owner, _, rest = line.partition(":")
        start, _, count = rest.partition(":")
        if owner == name and start.isdigit() and count.isdigit():
            out.append(f"{start}-{int(start) + int(count) - 1}")
    return out


def _make_user(name: str, ranged: bool) -> Iterator[BuildUser]:
    """A user made with shadow's own tools (they lock the files other runs may edit)."""
    _python_is_usable()
    subprocess.run(["userdel", name], capture_output=True, check=False)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
    home = None
    try:
        uids, gids = _subids(name, "/etc/subuid"), _subids(name, "/etc/subgid")
        if ranged and not (uids and gids):
            for flag in ("--add-subuids", "--add-subgids"):
                subprocess.run(["usermod", flag, "310000-375535", name], check=True)
        if not ranged:  # useradd may have given it a range: take it away
            for flag, ranges in (("--del-subuids", uids), ("--del-subgids", gids)):
                for r in ranges:
                    subprocess.run(["usermod", flag, r, name], check=True)
        entry = pwd.getpwnam(name)
        home = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        os.chmod(home, 0o755)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        yield BuildUser(name, entry.pw_uid, home)
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)  # and its ranges
        if home is not None:
            # The cache holds files of the user's subordinate ids: remove as root.
            shutil.rmtree(home, ignore_errors=True)


# Per test process: several test runs may share this machine.
SUFFIX = os.getpid() % 100000


@pytest.fixture(scope="module")
def ranged_user() -> Iterator[BuildUser]:
    yield from _make_user(f"dbrl{SUFFIX}", ranged=True)


@pytest.fixture(scope="module")
def single_user() -> Iterator[BuildUser]:
    yield from _make_user(f"dbsi{SUFFIX}", ranged=False)


def _give(user: BuildUser, src: Path, name: str) -> Path:
    dest = user.home / name
    shutil.copytree(src, dest, symlinks=True)
    subprocess.run(["chown", "-R", f"{user.uid}", str(dest)], check=True)
    return dest


def _context(user: BuildUser, name: str, dockerfile: str, files: dict[str, str] | None = None) -> Path:
    """A build context of the user's, with a Dockerfile and ``files`` (path: text)."""
    ctx = user.home / name
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    for rel, text in (files or {}).items():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text(text)
    subprocess.run(["chown", "-R", str(user.uid), str(ctx)], check=True)
    return ctx


DOCKERFILE = """\
FROM busybox
RUN touch /a /b /c && chown 1000:1000 /a && chown 65534:65534 /b \\
 && mkdir -p /d/opq && touch /d/opq/old && id -u > /whoami
RUN rm -rf /d/opq && mkdir /d/opq && touch /d/opq/new \\
 && stat -c '%u:%g' /a /b > /owners
RUN --mount=type=cache,target=/cache,uid=1000,gid=65534 stat -c '%u:%g' /cache > /cache-owner \\
 && echo hit >> /cache/log && cat /cache/log > /cache-log
RUN --network=none ip -o link | wc -l > /links
RUN --mount=type=bind,from=busybox,target=/m,rw rm -rf /m/etc && mkdir /m/etc \
 && touch /m/etc/x && ls /m/etc > /rw-bind
"""


@pytest.mark.parametrize("executor", ["namespace", "runc"])
def test_a_user_with_subuids_builds_like_root_with_ids_kept(
    ranged_user: BuildUser, busybox_layout: Path, executor: str
) -> None:
    if executor == "runc" and shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    layout = ranged_user.home / "busybox"
    if not layout.exists():
        _give(ranged_user, busybox_layout, "busybox")
    ctx = _context(ranged_user, f"ctx-{executor}", DOCKERFILE)
    out = ranged_user.home / f"out-{executor}.tar"
    info = json.loads(ranged_user.dockbuild("debug", "info").stdout)
    assert info["executor"]["executor"] == "namespace"
    assert info["executor"]["rootless"]["map"] == "subuid"
    args = (
        "--progress=plain",
        "--executor",
        executor,
        "--build-context",
        f"busybox=oci-layout://{layout}",
    )
    run = ranged_user.dockbuild(*args, "-o", f"type=oci,dest={out}", str(ctx))
    assert "WARNING" not in run.stderr
    assert out.stat().st_uid == ranged_user.uid  # outputs belong to the user
    layers = read_oci(out).layers
    first = {m.name: m for m in layers[1].getmembers()}
    assert (first["a"].uid, first["a"].gid) == (1000, 1000)
    assert (first["b"].uid, first["b"].gid) == (65534, 65534)
    assert (first["c"].uid, first["c"].gid) == (0, 0)
    files = layer_files(layers)
    assert files["whoami"] == b"0\n"
    assert files["owners"] == b"1000:1000\n65534:65534\n"
    assert files["cache-owner"] == b"1000:65534\n"
    assert files["links"] == b"1\n"
    assert files["rw-bind"] == b"x\n"  # a rw bind mount's overlay can make opaque dirs
    second = [m.name for m in layers[2].getmembers()]
    assert "d/opq/.wh..wh..opq" in second and "d/opq/new" in second  # opaque dir, as root
    assert not any(name.startswith("cache") and "/" in name for name in files)
    # The cache mount persists across the user's builds.
    ranged_user.dockbuild(*args, "--no-cache", "-o", f"type=oci,dest={out}", str(ctx))
    files = layer_files(read_oci(out).layers)
    assert files["cache-log"].endswith(b"hit\nhit\n")  # shared with the other executor's run


@pytest.mark.parametrize("executor", ["namespace", "runc"])
def test_add_host_and_shm_size_work_rootless(
    ranged_user: BuildUser, busybox_layout: Path, executor: str
) -> None:
    if executor == "runc" and shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    layout = ranged_user.home / "busybox"
    if not layout.exists():
        _give(ranged_user, busybox_layout, "busybox")
    ctx = _context(
        ranged_user, f"ctx-hosts-{executor}",
        "FROM busybox\nRUN grep myhost /etc/hosts > /found && df -k /dev/shm | tail -1 > /shm\n",
    )  # fmt: skip
    out = ranged_user.home / f"out-hosts-{executor}.tar"
    ranged_user.dockbuild(
        "--progress=plain", "--executor", executor, "--build-context", f"busybox=oci-layout://{layout}",
        "--add-host", "myhost=10.9.8.7", "--shm-size", "96m", "-o", f"type=oci,dest={out}", str(ctx),
    )  # fmt: skip
    files = layer_files(read_oci(out).layers)
    assert files["found"] == b"10.9.8.7\tmyhost\n"
    assert files["shm"].split()[1] == str(96 * 1024).encode()


def test_a_user_without_subuids_gets_one_id_and_a_warning(single_user: BuildUser) -> None:
    # FROM scratch with a static busybox bound in: no base image to unpack.
    tools = single_user.home / "tools"
    tools.mkdir()
    shutil.copy2("/bin/busybox", tools / "busybox")
    subprocess.run(["chown", "-R", str(single_user.uid), str(tools)], check=True)
    ctx = _context(
        single_user, "ctx",
        "FROM scratch\n"
        'RUN --mount=from=tools,target=/t ["/t/busybox", "sh", "-c", '
        '"/t/busybox id -u > /whoami; /t/busybox chown 1000 /whoami; echo $? > /chown"]\n',
    )  # fmt: skip
    info = json.loads(single_user.dockbuild("debug", "info").stdout)
    assert info["executor"]["rootless"]["map"] == "single"
    assert "usermod --add-subuids" in info["executor"]["warning"]
    out = single_user.home / "out.tar"
    run = single_user.dockbuild(
        "--progress=plain",
        "--build-context",
        f"tools={tools}",
        "-o",
        f"type=oci,dest={out}",
        str(ctx),
    )
    assert "WARNING: rootless build with a single-ID mapping" in run.stderr
    assert (
        f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {single_user.name}"
        in run.stderr
    )
    (layer,) = read_oci(out).layers
    files = {m.name: layer.extractfile(m).read() for m in layer.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert files["whoami"] == b"0\n"
    assert files["chown"] != b"0\n"  # uid 1000 does not exist in a single-ID namespace


def test_copy_chown_with_a_single_id_mapping_keeps_the_owner_in_the_layer(
    single_user: BuildUser,
) -> None:
    ctx = _context(
        single_user, "chown-ctx",
        "FROM scratch\nCOPY --chown=1000:1001 f d /app/\nCOPY --chown=65534 f /nobody\n",
        {"f": "f", "d/g": "g"},
    )  # fmt: skip
    out = single_user.home / "chown.tar"
    single_user.dockbuild("--progress=plain", "-o", f"type=oci,dest={out}", str(ctx))
    owners = {
        m.name: (m.uid, m.gid, m.pax_headers.get("SCHILY.xattr.user.dockbuild.owner"))
        for layer in read_oci(out).layers
        for m in layer.getmembers()
    }
    assert owners["app/f"] == owners["app/g"] == (1000, 1001, None)
    assert owners["nobody"] == (65534, 65534, None)
    # A symlink has nowhere to keep another owner: a clear error, no traceback.
    (ctx / "d" / "link").symlink_to("g")
    os.lchown(ctx / "d" / "link", single_user.uid, -1)
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY --chown=1000 d /d\n")
    failed = single_user.dockbuild("--progress=plain", "-o", f"type=oci,dest={out}", str(ctx), check=False)
    assert failed.returncode != 0
    assert "cannot give a symlink the owner 1000:1000" in failed.stderr
    assert "usermod --add-subuids" in failed.stderr and "Traceback" not in failed.stderr


def test_copy_from_with_a_single_id_mapping_keeps_the_recorded_owners(
    single_user: BuildUser,
) -> None:
    ctx = _context(
        single_user, "from-ctx",
        "FROM scratch AS base\n"
        "COPY --chown=1000:1001 f d /app/\n"
        "FROM scratch\n"
        "COPY --from=base /app/f /f\n"
        "COPY --link --from=base /app/f /linked\n"
        "COPY --from=base /app/ /copied/\n"
        "COPY --from=base --chown=65534 /app/f /nobody\n"
        "COPY --parents --from=base /app/f /\n"
        "COPY f /app/h\n",
        {"f": "f", "d/g": "g"},
    )  # fmt: skip
    out = single_user.home / "from.tar"
    single_user.dockbuild("--progress=plain", "-o", f"type=oci,dest={out}", str(ctx))
    layers = [
        {m.name: (m.uid, m.gid, m.pax_headers.get("SCHILY.xattr.user.dockbuild.owner")) for m in layer.getmembers()}
        for layer in read_oci(out).layers
    ]
    owners = {name: owner for members in layers for name, owner in members.items()}
    kept = (1000, 1001, None)
    assert owners["f"] == owners["linked"] == owners["copied/f"] == owners["copied/g"] == kept
    assert owners["copied"] == (0, 0, None)  # made by the copy, as BuildKit does
    assert owners["nobody"] == (65534, 65534, None)  # --chown wins
    # /app: made with its source's owner by --parents, then copied up by the last COPY.
    assert [members["app"] for members in layers if "app" in members] == [kept, kept]
    assert owners["app/f"] == kept and owners["app/h"] == (0, 0, None)


def test_layers_unpacked_with_a_single_id_mapping_keep_their_owners_for_copies(
    single_user: BuildUser, dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    # The base image, made as root: its layer gives a directory, a file and a symlink
    # to 1000:1001.
    base_ctx = tmp_path / "base-ctx"
    (base_ctx / "thing" / "d").mkdir(parents=True)
    (base_ctx / "thing" / "f").write_text("f")
    (base_ctx / "thing" / "d" / "g").write_text("g")
    (base_ctx / "thing" / "link").symlink_to("f")
    (base_ctx / "Dockerfile").write_text("FROM busybox\nCOPY --chown=1000:1001 thing /thing\n")
    dockbuild.build(base_ctx, "-o", f"type=oci,tar=false,dest={tmp_path / 'base'}")
    layout = _give(single_user, tmp_path / "base", "base")
    # As the user: a copy of the base's files, and a RUN that copies up its directory.
    ctx = _context(
        single_user, "unpack-ctx",
        "FROM base\n"
        "COPY --from=base /thing /copied\n"
        "RUN touch /thing/new\n",
    )  # fmt: skip
    out = single_user.home / "unpack.tar"
    single_user.dockbuild(
        "--progress=plain", "--build-context", f"base=oci-layout://{layout}",
        "-o", f"type=oci,dest={out}", str(ctx),
    )  # fmt: skip
    copied, ran = (
        {m.name: (m.uid, m.gid, m.pax_headers.get("SCHILY.xattr.user.dockbuild.owner")) for m in layer.getmembers()}
        for layer in read_oci(out).layers[-2:]
    )
    kept = (1000, 1001, None)
    assert copied["copied/f"] == copied["copied/d"] == copied["copied/d/g"] == kept
    assert "copied/link" in copied  # a symlink's owner has nowhere to go: it is not an error
    assert ran["thing"] == kept  # copied up to hold the new file
    assert ran["thing/new"] == (0, 0, None)
