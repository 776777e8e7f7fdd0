"""The walking skeleton through the real CLI: Dockerfile in, images out, the cache at work."""

from __future__ import annotations

import io
import json
import os
import pty
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from clitools import DOCKBUILD, DockbuildCLI, read_oci, require_docker, write_context

from dockbuild import __version__


def _tar(data: bytes) -> tarfile.TarFile:
    """A tar held in memory: nothing to close."""
    return tarfile.open(fileobj=io.BytesIO(data))  # noqa: SIM115


def _steps(stderr: str) -> dict[str, str]:
    """Plain progress -> {step name: CACHED | DONE | ERROR}."""
    names: dict[str, str] = {}
    status: dict[str, str] = {}
    for line in stderr.splitlines():
        if not line.startswith("#"):
            continue
        num, _, rest = line.partition(" ")
        if rest.startswith("[") or rest.startswith("exporting") or rest.startswith("FROM"):
            names.setdefault(num, rest)
        elif rest == "CACHED" or rest.startswith("DONE") or rest.startswith("ERROR"):
            status[num] = rest.split()[0].rstrip(":")
    return {names[n]: s for n, s in status.items() if n in names}


def _step(steps: dict[str, str], instruction: str) -> str:
    """The status of the one step whose name ends with ``instruction``."""
    (status,) = [v for k, v in steps.items() if k.endswith("] " + instruction)]
    return status


def test_version_prints_the_package_version(dockbuild: DockbuildCLI) -> None:
    assert dockbuild("--version").out.strip() == f"dockbuild {__version__}"


@pytest.mark.docker
def test_hello_example_loads_into_docker_and_runs(dockbuild: DockbuildCLI, hello: Path) -> None:
    require_docker()
    tag = f"dockbuild-test-hello:{os.getpid()}"
    built = dockbuild.build(hello, "-t", tag)
    assert "manifest.json" in _tar(built.stdout).getnames()
    load = subprocess.run(["docker", "load"], input=built.stdout, capture_output=True, timeout=120)
    assert load.returncode == 0, load.stderr
    try:
        run = subprocess.run(["docker", "run", "--rm", tag], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "hello from a dockbuild image (running as user in /app)" in run.stdout
        assert "hello from a RUN step" in run.stdout
        assert "this file came from the build context" in run.stdout
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=60)


def test_oci_output_to_a_file_is_accepted_by_skopeo_and_umoci(
    dockbuild: DockbuildCLI, hello: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "hello.tar"
    dockbuild.build(hello, "-t", "hello:1", "-o", f"type=oci,dest={dest}")
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{dest}"], capture_output=True, text=True, timeout=60
    )
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["Labels"]["org.opencontainers.image.title"] == "hello"
    layout = tmp_path / "layout"
    layout.mkdir()
    with tarfile.open(dest) as tf:
        tf.extractall(layout, filter="fully_trusted")
    bundle = tmp_path / "bundle"
    unpack = subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:1", str(bundle)],
        capture_output=True, text=True, timeout=60,
    )
    assert unpack.returncode == 0, unpack.stderr
    rootfs = bundle / "rootfs" if (bundle / "rootfs").exists() else bundle
    assert (rootfs / "hello.txt").read_text() == "hello from a RUN step\n"
    assert (rootfs / "app/data/message.txt").read_text() == "this file came from the build context\n"


def test_oci_output_to_stdout_equals_the_file_output(
    dockbuild: DockbuildCLI, hello: Path, tmp_path: Path
) -> None:
    epoch = {"SOURCE_DATE_EPOCH": "1700000000"}
    dest = tmp_path / "hello.tar"
    dockbuild.build(hello, "-o", f"type=oci,dest={dest}", env=epoch)
    streamed = dockbuild.build(hello, "-o", "type=oci", env=epoch).stdout
    assert streamed == dest.read_bytes()


def test_image_config_and_history_follow_the_dockerfile(
    dockbuild: DockbuildCLI, hello: Path
) -> None:
    image = read_oci(dockbuild.build(hello, "-o", "type=oci").stdout)
    manifest, config, layers = image.manifest, image.config, image.layers
    cfg = config["config"]
    assert cfg["Cmd"] == ["greet"]
    assert cfg["WorkingDir"] == "/app"
    assert cfg["User"] == "user"
    assert "GREETING=hello" in cfg["Env"]
    assert any(e.startswith("PATH=") for e in cfg["Env"])
    assert cfg["Labels"] == {"org.opencontainers.image.title": "hello"}
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    # Every layer has one non-empty history entry, in order, and one diff_id.
    non_empty = [h for h in config["history"] if not h.get("empty_layer")]
    assert len(non_empty) == len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])
    created_by = [h["created_by"] for h in config["history"]]
    assert created_by[-3:] == ["COPY data/ ./data/ # buildkit", "USER user", 'CMD ["greet"]']
    # BuildKit lists the stage's ARGs before a RUN command (`ARG GREETING` is in scope).
    assert any(c.startswith("RUN |1 GREETING=hello /bin/sh -c echo") for c in created_by)
    # The last layer holds exactly what its COPY added (and the dirs leading to it).
    names = sorted(layers[-1].getnames())
    assert names == ["app", "app/data", "app/data/message.txt"]


def test_local_output_writes_the_merged_rootfs(
    dockbuild: DockbuildCLI, hello: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    dockbuild.build(hello, "-o", f"type=local,dest={out}")
    assert (out / "hello.txt").read_text() == "hello from a RUN step\n"
    greet = out / "usr/local/bin/greet"
    assert greet.read_bytes() == (hello / "greet.sh").read_bytes()
    assert os.stat(greet).st_mode & 0o777 == 0o755
    assert (out / "bin/busybox").is_file() and (out / "bin/sh").is_symlink()
    assert not (out / "app/Dockerfile").exists()  # .dockerignore'd, and never copied anyway


def test_tar_output_writes_the_rootfs_as_a_tar(
    dockbuild: DockbuildCLI, hello: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "rootfs.tar"
    dockbuild.build(hello, "-o", f"type=tar,dest={dest}")
    with tarfile.open(dest) as tf:
        names = set(tf.getnames())
        assert {"hello.txt", "app/data/message.txt", "usr/local/bin/greet", "etc/passwd"} <= names
        assert tf.extractfile("hello.txt").read() == b"hello from a RUN step\n"  # type: ignore[union-attr]
        assert not any(".wh." in n for n in names)


def test_a_pipe_gets_a_docker_tarball_by_default(dockbuild: DockbuildCLI, hello: Path) -> None:
    out = dockbuild.build(hello, "-t", "hello:1").stdout
    tf = _tar(out)
    (entry,) = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert entry["RepoTags"] == ["hello:1"]
    assert len(entry["Layers"]) == 5


def test_a_terminal_keeps_the_result_in_the_cache_and_says_how_to_export(
    dockbuild: DockbuildCLI, hello: Path
) -> None:
    main, child = pty.openpty()
    try:
        proc = subprocess.run(
            [DOCKBUILD, "--progress=plain", *dockbuild.base_context, str(hello)],
            stdout=child, stderr=subprocess.PIPE, env=dockbuild.env(), timeout=300,
        )
    finally:
        os.close(child)
        os.close(main)
    assert proc.returncode == 0
    assert "Build result kept in the cache" in proc.stderr.decode()


def test_a_rebuild_reports_every_step_cached_and_runs_nothing(
    dockbuild: DockbuildCLI, hello: Path
) -> None:
    first = _steps(dockbuild.build(hello, "-o", "type=oci").stderr)
    assert "DONE" in first.values()
    again = _steps(dockbuild.build(hello, "-o", "type=oci").stderr)
    build_steps = {k: v for k, v in again.items() if k.startswith("[") and "[internal]" not in k}
    assert len(build_steps) == 5  # FROM, RUN, WORKDIR, 2 COPY
    assert set(build_steps.values()) == {"CACHED"}


def test_editing_one_context_file_reruns_only_the_steps_that_read_it(
    dockbuild: DockbuildCLI, hello: Path
) -> None:
    dockbuild.build(hello, "-o", "type=oci")
    (hello / "data/message.txt").write_text("edited\n")
    steps = _steps(dockbuild.build(hello, "-o", "type=oci").stderr)
    assert steps["[stage-1 3/3] COPY data/ ./data/"] == "DONE"
    assert steps["[stage-1 2/3] COPY greet.sh /usr/local/bin/greet"] == "CACHED"
    assert steps['[base 2/2] RUN echo "$GREETING from a RUN step" > /hello.txt'] == "CACHED"


def test_no_cache_runs_every_step_again(dockbuild: DockbuildCLI, hello: Path) -> None:
    dockbuild.build(hello, "-o", "type=oci")
    steps = _steps(dockbuild.build(hello, "--no-cache", "-o", "type=oci").stderr)
    assert _step(steps, 'RUN echo "$GREETING from a RUN step" > /hello.txt') == "DONE"


def test_a_failing_run_names_the_command_exit_code_log_and_line(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {"Dockerfile": "FROM busybox\nRUN echo first-line && echo last-words >&2 && exit 3\n"},
    )
    dest = tmp_path / "never.tar"
    run = dockbuild.build(ctx, "-o", f"type=oci,dest={dest}", check=False)
    assert run.returncode == 1
    assert "exit code: 3" in run.stderr
    assert "echo first-line && echo last-words >&2 && exit 3" in run.stderr
    assert "last-words" in run.stderr
    assert "Dockerfile:2" in run.stderr
    assert "Traceback" not in run.stderr
    assert not dest.exists() and not list(tmp_path.glob("never.tar*"))


def test_a_syntax_error_names_the_line_with_a_pointer_and_no_traceback(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN true\nRUNN echo hi\n"})
    run = dockbuild.build(ctx, "-o", "type=oci", check=False)
    assert run.returncode == 1
    assert "Dockerfile:3" in run.stderr
    assert ">>> RUNN echo hi" in run.stderr
    assert "unknown instruction" in run.stderr.lower() and "did you mean run" in run.stderr.lower()
    assert "Traceback" not in run.stderr


def test_from_a_registry_image_pulls_over_http_and_verifies(
    dockbuild: DockbuildCLI, busybox_ref: str, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {"Dockerfile": f"FROM {busybox_ref}\nRUN cat /etc/passwd | cut -d: -f1 > /users\n"},
    )
    image = read_oci(dockbuild("--progress=plain", str(ctx), "-o", "type=oci").stdout)
    config, layers = image.config, image.layers
    users = layers[-1].extractfile("users").read().decode().split()  # type: ignore[union-attr]
    assert users == ["root", "user", "nobody"] or set(users) >= {"root", "nobody"}
    assert config["config"]["Cmd"] == ["sh"]
    # A tag resolved once is reused from the cache: the registry is not asked again.
    again = dockbuild("--progress=plain", str(ctx), "-o", "type=oci", env={"NO_PROXY": "*"})
    assert again.returncode == 0


def test_a_corrupt_base_layer_in_the_registry_is_rejected(
    dockbuild: DockbuildCLI, registry, busybox_layout: Path, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    registry.push_layout(busybox_layout, "tampered/busybox:latest")
    manifest = json.loads(
        (busybox_layout / "blobs/sha256" / json.loads((busybox_layout / "index.json").read_text())["manifests"][0]["digest"].split(":")[1]).read_text()
    )
    layer = manifest["layers"][0]["digest"]
    stored = registry.blob_data_path(layer)
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-10] + b"0123456789")
        ctx = write_context(
            tmp_path / "ctx", {"Dockerfile": f"FROM {registry.host}/tampered/busybox:latest\nRUN true\n"}
        )
        run = dockbuild("--progress=plain", str(ctx), "-o", "type=oci", check=False)
    finally:
        stored.write_bytes(original)
    assert run.returncode == 3  # a registry failure
    assert layer in run.stderr and "Traceback" not in run.stderr


def test_target_build_args_and_copy_from_a_stage(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": (
                "FROM busybox AS build\n"
                "ARG FLAVOUR=plain\n"
                "RUN echo $FLAVOUR > /artifact\n"
                "FROM busybox AS unused\n"
                "RUN exit 1\n"
                "FROM busybox AS final\n"
                "COPY --from=build /artifact /from-build\n"
                "FROM busybox AS other\n"
                "RUN echo other > /other\n"
            )
        },
    )
    out = tmp_path / "out"
    run = dockbuild.build(ctx, "--target", "final", "--build-arg", "FLAVOUR=spicy", "-o", f"type=local,dest={out}")
    assert (out / "from-build").read_text() == "spicy\n"
    assert not (out / "other").exists()
    assert "RUN exit 1" not in run.stderr  # the unused stage is never solved


def test_debug_llb_digests_are_stable_across_runs_and_cache_roots(
    dockbuild: DockbuildCLI, hello: Path, tmp_path: Path
) -> None:
    first = json.loads(dockbuild("debug", "llb", *dockbuild.base_context, str(hello)).out)
    other = DockbuildCLI(tmp_path / "other-cache", dockbuild.busybox)
    second = json.loads(other("debug", "llb", *other.base_context, str(hello)).out)
    assert first["llb"]["root"] == second["llb"]["root"]
    assert [op["digest"] for op in first["llb"]["ops"]] == [op["digest"] for op in second["llb"]["ops"]]
    kinds = {op["op"] for op in first["llb"]["ops"]}
    assert {"SourceOp", "ExecOp", "FileOp"} <= kinds


def test_progress_goes_to_stderr_and_stdout_carries_only_the_archive(
    dockbuild: DockbuildCLI, hello: Path
) -> None:
    run = dockbuild.build(hello, "-o", "type=tar")
    assert _tar(run.stdout).getnames()
    assert "#1 [internal] load build definition from Dockerfile" in run.stderr
    assert "DONE" in run.stderr


def test_quiet_progress_prints_nothing_on_success(dockbuild: DockbuildCLI, hello: Path, tmp_path: Path) -> None:
    run = dockbuild("--progress=quiet", *dockbuild.base_context, str(hello), "-o", f"type=oci,dest={tmp_path / 'x.tar'}")
    assert run.stderr == ""


def test_quiet_with_the_archive_on_stdout_prints_the_id_on_stderr(
    dockbuild: DockbuildCLI, hello: Path, tmp_path: Path
) -> None:
    """`dockbuild -q . > img.tar`: stdout is the docker tarball and nothing else."""
    iid = tmp_path / "iid"
    for args in ([], ["-o", "type=oci,dest=-"]):  # a docker tarball on a pipe by default
        run = dockbuild("-q", "--iidfile", str(iid), *dockbuild.base_context, *args, str(hello))
        assert _tar(run.stdout).getnames()
        assert len(run.stdout) % 512 == 0  # a tar, block by block, with nothing after it
        assert not run.stdout.rstrip(b"\0").endswith(iid.read_bytes() + b"\n")
        assert run.stderr.strip() == iid.read_text()


def test_a_missing_context_is_a_clear_error(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    run = dockbuild("--progress=plain", str(tmp_path / "nope"), check=False)
    assert run.returncode == 1
    assert "not found" in run.stderr and "Traceback" not in run.stderr


def test_the_cache_lives_under_dockbuild_root(dockbuild: DockbuildCLI, hello: Path) -> None:
    dockbuild.build(hello, "-o", "type=oci")
    assert (dockbuild.root / "db.sqlite").is_file()
    assert any((dockbuild.root / "blobs/sha256").iterdir())
    assert any((dockbuild.root / "snapshots").iterdir())
    # Nothing of this build's work area is left behind.
    assert list((dockbuild.root / "tmp").iterdir()) == []


def test_python_m_dockbuild_is_the_same_command(dockbuild: DockbuildCLI) -> None:
    import sys

    proc = subprocess.run([sys.executable, "-m", "dockbuild", "--version"], capture_output=True, text=True)
    assert proc.stdout.strip() == f"dockbuild {__version__}"
    assert shutil.which("dockbuild") or os.path.exists(DOCKBUILD)


def test_a_docker_image_build_context_replaces_what_from_names(
    dockbuild: DockbuildCLI, busybox_ref: str, tmp_path: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM base\nRUN echo ok > /ok\n"})
    out = tmp_path / "out"
    dockbuild(
        "--progress=plain", "--build-context", f"base=docker-image://{busybox_ref}",
        str(ctx), "-o", f"type=local,dest={out}",
    )
    assert (out / "ok").read_text() == "ok\n"


def test_tty_progress_draws_the_steps_on_a_terminal(
    dockbuild: DockbuildCLI, hello: Path, tmp_path: Path
) -> None:
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [DOCKBUILD, "--progress=tty", *dockbuild.base_context, str(hello),
         "-o", f"type=oci,dest={tmp_path / 'x.tar'}"],
        stdin=subprocess.DEVNULL, stdout=child, stderr=child, env=dockbuild.env(),
    )
    os.close(child)
    screen = b""
    try:
        while True:  # read as it draws: a full pty would block the build
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the build exited and closed the terminal
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(main)
    proc.wait(timeout=300)
    assert proc.returncode == 0
    text = screen.decode(errors="replace")
    assert "Building" in text and "COPY greet.sh /usr/local/bin/greet" in text


def test_a_broken_config_file_is_a_warning_not_a_failed_build(dockbuild: DockbuildCLI, hello: Path, tmp_path: Path) -> None:
    for text, message in [
        ("[worker.oci\nmax-parallelism = ", "invalid config"),
        ("[worker.oci]\nmax-parallelism = -3\n", "max-parallelism must be a positive integer"),
    ]:
        config = tmp_path / "config.toml"
        config.write_text(text)
        run = dockbuild.build(hello, "-o", f"type=oci,dest={tmp_path / 'x.tar'}", env={"DOCKBUILD_CONFIG": str(config)})
        assert "WARNING: " in run.stderr and message in run.stderr
        assert read_oci(tmp_path / "x.tar").manifest["layers"]
