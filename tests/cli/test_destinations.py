"""Where outputs land, through the real CLI: a FIFO, a device, a socket or a symlink at
``dest=``, ``--iidfile`` or ``--metadata-file`` is written through (never replaced), a
regular file is replaced atomically, missing parent directories are made, and
``type=local`` writes into an existing directory as BuildKit does."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import stat
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from clitools import DOCKBUILD, DockbuildCLI, read_oci, write_context

DOCKERFILE = "FROM busybox\nCOPY hello.txt /hello.txt\n"


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return write_context(tmp_path / "app", {"Dockerfile": DOCKERFILE, "hello.txt": "hello\n"})


@contextlib.contextmanager
def _reading(fifo: Path) -> Iterator[bytearray]:
    """Read everything written to ``fifo`` in a thread; the bytes are there after the block."""
    data = bytearray()

    def read() -> None:
        with open(fifo, "rb") as f:
            while chunk := f.read(1 << 16):
                data.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield data
    finally:
        if reader.is_alive():  # no writer came (a failed build): let the reader go
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=60)


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_an_oci_archive_streams_into_a_fifo_that_stays_a_fifo(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "out" / "image.fifo"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with _reading(fifo) as data:
        dockbuild.build(app, "-o", f"type=oci,dest={fifo}")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert _entries(fifo.parent) == ["image.fifo"]  # no temp file, no regular file
    image = read_oci(bytes(data))
    assert any("hello.txt" in layer.getnames() for layer in image.layers)


def test_iidfile_and_metadata_file_are_written_through_fifos(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    iid, meta = tmp_path / "iid.fifo", tmp_path / "meta.fifo"
    os.mkfifo(iid)
    os.mkfifo(meta)
    with _reading(iid) as iid_data, _reading(meta) as meta_data:
        dockbuild.build(
            app, "-o", f"type=oci,dest={tmp_path / 'image.tar'}",
            "--iidfile", str(iid), "--metadata-file", str(meta),
        )  # fmt: skip
    assert stat.S_ISFIFO(os.lstat(iid).st_mode) and stat.S_ISFIFO(os.lstat(meta).st_mode)
    image_id = bytes(iid_data).decode()
    assert image_id.startswith("sha256:")
    assert json.loads(bytes(meta_data))["containerimage.config.digest"] == image_id


def test_a_character_device_destination_is_written_to_and_stays_a_device(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    """A null device of our own (1,3, as /dev/null), never the system's."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    devices = tmp_path / "devices"
    devices.mkdir()
    null = devices / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    dockbuild.build(
        app, "-o", f"type=oci,dest={null}", "-o", f"type=tar,dest={null}",
        "--iidfile", str(null), "--metadata-file", str(null),
    )  # fmt: skip
    st = os.lstat(null)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert _entries(devices) == ["null"]


def test_a_unix_socket_destination_gets_the_archive(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    path = tmp_path / "rootfs.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    data = bytearray()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(1 << 16):
                data.extend(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        dockbuild.build(app, "-o", f"type=tar,dest={path}")
        thread.join(timeout=60)
    finally:
        server.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        assert tar.extractfile("hello.txt").read() == b"hello\n"  # type: ignore[union-attr]


def test_dev_stdout_is_written_through_to_a_pipe_or_a_file(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    """/dev/stdout names dockbuild's own stdout (a magic link into /proc): written, and
    nothing is made or replaced in /dev."""
    piped = dockbuild.build(app, "-o", "type=tar,dest=/dev/stdout")
    with tarfile.open(fileobj=io.BytesIO(piped.stdout)) as tar:
        assert tar.extractfile("hello.txt").read() == b"hello\n"  # type: ignore[union-attr]
    redirected = tmp_path / "rootfs.tar"
    redirected.write_bytes(b"stale bytes that the shell's > would have truncated" * 1000)
    with open(redirected, "r+b") as stdout:
        done = subprocess.run(
            [DOCKBUILD, "--progress=plain", *dockbuild.base_context,
             "-o", "type=tar,dest=/dev/stdout", str(app)],
            stdout=stdout, stderr=subprocess.PIPE, env=dockbuild.env(), timeout=300, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert redirected.read_bytes() == piped.stdout  # truncated first, as `>` does
    assert not [p for p in os.listdir("/dev") if p.startswith(".stdout.") or p.startswith(".1.")]


def test_a_symlink_to_a_regular_file_keeps_the_link_and_replaces_the_target(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    target = store / "image.tar"
    target.write_bytes(b"an older export")
    kept = store / "older.tar"
    os.link(target, kept)  # another name of the old file: the target was replaced, not rewritten
    link = tmp_path / "latest.tar"
    link.symlink_to("store/image.tar")
    iid = tmp_path / "iid"
    iid.symlink_to("store/iid.txt")
    dockbuild.build(app, "-o", f"type=oci,dest={link}", "--iidfile", str(iid))
    assert os.readlink(link) == "store/image.tar" and os.readlink(iid) == "store/iid.txt"
    assert read_oci(target).layers
    assert kept.read_bytes() == b"an older export"
    assert (store / "iid.txt").read_text().startswith("sha256:")
    assert _entries(store) == ["iid.txt", "image.tar", "older.tar"]


def test_a_symlink_to_a_fifo_writes_through_both(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "out.tar"
    link.symlink_to(fifo)
    with _reading(fifo) as data:
        dockbuild.build(app, "-o", f"type=tar,dest={link}")
    assert os.readlink(link) == str(fifo) and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        assert "hello.txt" in tar.getnames()


def test_a_dangling_symlink_gets_its_target_created(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    link = tmp_path / "image.tar"
    link.symlink_to("archive/new/image.tar")  # the target's parents do not exist either
    dockbuild.build(app, "-o", f"type=docker,dest={link}")
    assert link.is_symlink() and os.readlink(link) == "archive/new/image.tar"
    with tarfile.open(tmp_path / "archive" / "new" / "image.tar") as tar:
        assert "manifest.json" in tar.getnames()


def test_missing_parent_directories_are_made_for_every_file_output(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    out = tmp_path / "new"
    dockbuild.build(
        app,
        "-o", f"type=oci,dest={out / 'oci' / 'image.tar'}",
        "-o", f"type=tar,dest={out / 'tar' / 'rootfs.tar'}",
        "-o", f"type=local,dest={out / 'local' / 'rootfs'}",
        "--iidfile", str(out / "ids" / "iid"),
        "--metadata-file", str(out / "meta" / "metadata.json"),
    )  # fmt: skip
    assert read_oci(out / "oci" / "image.tar").layers
    with tarfile.open(out / "tar" / "rootfs.tar") as tar:
        assert "hello.txt" in tar.getnames()
    assert (out / "local" / "rootfs" / "hello.txt").read_text() == "hello\n"
    assert (out / "ids" / "iid").read_text().startswith("sha256:")
    assert "containerimage.digest" in json.loads((out / "meta" / "metadata.json").read_text())


def test_local_output_writes_into_an_existing_directory_and_keeps_other_files(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    """BuildKit's local exporter writes into dest: same names are replaced, the rest stays."""
    dest = tmp_path / "rootfs"
    dest.mkdir()
    (dest / "hello.txt").write_text("an old hello")
    (dest / "mine.txt").write_text("not from the build")
    dockbuild.build(app, "-o", f"type=local,dest={dest}")
    assert (dest / "hello.txt").read_text() == "hello\n"
    assert (dest / "mine.txt").read_text() == "not from the build"
    assert (dest / "bin" / "sh").exists()


def test_local_output_follows_a_symlink_to_a_directory(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "mine.txt").write_text("kept")
    link = tmp_path / "rootfs"
    link.symlink_to("real")
    dockbuild.build(app, "-o", str(link))
    assert link.is_symlink()
    assert (real / "hello.txt").read_text() == "hello\n"
    assert (real / "mine.txt").read_text() == "kept"


def test_a_directory_output_never_replaces_a_file(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    plain = tmp_path / "plain"
    plain.write_text("a file")
    for dest in (fifo, plain):
        run = dockbuild.build(app, "-o", f"type=local,dest={dest}", check=False)
        assert run.returncode != 0 and str(dest) in run.stderr
        assert "not a directory" in run.stderr and "internal error" not in run.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and plain.read_text() == "a file"
    # nothing left beside them (the cache root is made only when a build gets that far)
    assert set(_entries(tmp_path)) - {"cache"} == {"app", "fifo", "plain"}


# --- every path is checked before any step runs ---------------------------------------------


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody may write to: a read-only tmpfs as root, else mode 0555."""
    path = tmp_path / "ro"
    path.mkdir()
    (path / "existing").mkdir()
    if os.geteuid() != 0:
        for p in (path / "existing", path):
            p.chmod(0o555)
        yield path
        for p in (path, path / "existing"):
            p.chmod(0o755)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    (path / "existing").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def _refused(dockbuild: DockbuildCLI, app: Path, *args: str, cwd: Path | None = None) -> str:
    """The one error line of a build refused before its first step."""
    run = dockbuild.build(app, *args, check=False, cwd=cwd)
    assert run.returncode != 0
    assert "internal error" not in run.stderr and "Traceback" not in run.stderr
    assert "COPY hello.txt" not in run.stderr  # no step ran
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("ERROR:")]
    return line


@pytest.mark.parametrize(
    "args",
    [
        ("-o", "type=oci,dest={ro}/image.tar"),
        ("-o", "type=docker,dest={ro}/new/dir/image.tar"),
        ("-o", "type=tar,dest={ro}/existing/rootfs.tar"),
        ("-o", "type=local,dest={ro}/rootfs"),
        ("-o", "type=oci,tar=false,dest={ro}/existing"),
        ("--iidfile", "{ro}/iid"),
        ("--metadata-file", "{ro}/meta/data.json"),
        ("--cache-to", "type=local,dest={ro}/existing"),
    ],
    ids=["oci", "docker-missing-parents", "tar", "local", "oci-dir", "iidfile", "metadata",
         "cache-to"],
)  # fmt: skip
def test_an_unwritable_destination_is_refused_before_the_build(
    dockbuild: DockbuildCLI, app: Path, read_only: Path, args: tuple[str, str]
) -> None:
    flag, value = args[0], args[1].format(ro=read_only)
    line = _refused(
        dockbuild, app, flag, value, "-o", f"type=tar,dest={read_only.parent / 'ok.tar'}"
    )
    assert "is not writable" in line and str(read_only) in line
    assert flag in line or value.split(",")[0] in line
    assert not (read_only.parent / "ok.tar").exists()  # no output was written either


def test_a_file_in_the_way_of_a_missing_directory_is_named(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    (tmp_path / "afile").write_text("x")
    line = _refused(dockbuild, app, "--iidfile", "afile/sub/iid", cwd=tmp_path)
    assert line == "ERROR: --iidfile afile/sub/iid: afile is not a directory"
    assert (tmp_path / "afile").read_text() == "x"


def test_a_directory_where_a_file_output_goes_is_refused(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "image.tar"
    folder.mkdir()
    line = _refused(dockbuild, app, "-o", f"type=oci,dest={folder}")
    assert line == f"ERROR: -o type=oci,dest={folder}: {folder} is a directory"
    line = _refused(dockbuild, app, "--metadata-file", str(folder))
    assert line == f"ERROR: --metadata-file {folder}: {folder} is a directory"


def test_a_missing_secret_file_is_refused_before_the_build(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-token"
    line = _refused(dockbuild, app, "--secret", f"id=token,src={missing}")
    assert str(missing) in line and "no file" in line


def test_an_unreadable_secret_file_is_refused_before_the_build(
    dockbuild: DockbuildCLI, app: Path, tmp_path: Path
) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file: a secret cannot be unreadable")
    token = tmp_path / "token"
    token.write_text("s3cr3t")
    token.chmod(0)
    line = _refused(dockbuild, app, "--secret", f"id=token,src={token}")
    assert line == f"ERROR: --secret id=token,src={token}: the file is not readable"
