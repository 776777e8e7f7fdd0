"""The chroot executor's rootfs: one working directory per stage, changed in place by
consecutive RUN steps, each step's layer found by a stat walk; copied where stages branch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from clitools import DockbuildCLI, layer_files, read_oci, write_context

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the chroot executor needs root")


def _layers(dockbuild: DockbuildCLI, ctx: Path, out: Path, *args: str) -> list[list[str]]:
    dockbuild.build(ctx, "-o", f"type=oci,dest={out}", *args)
    return [sorted(t.getnames()) for t in read_oci(out).layers[1:]]


def test_consecutive_steps_and_branches_give_the_namespace_executors_layers(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox AS base\n"
            "RUN mkdir -p /d/sub && echo 1 > /d/a && echo 2 > /d/sub/b && echo same > /s\n"
            # same size and mtime, another inode: still a change
            "RUN cp -p /s /s.new && echo SAME > /s.new && touch -r /s /s.new && mv /s.new /s\n"
            "RUN rm -r /d/sub && chmod 700 /d && ln -s a /d/link\n"
            "FROM base AS left\nRUN echo left > /left && cat /d/a > /seen-left\n"
            "FROM base AS right\nRUN echo right > /right && ls / > /seen-right\n"
            "FROM busybox\nCOPY --from=left /left /seen-left /\n"
            "COPY --from=right /right /seen-right /\nRUN cat /s > /final 2>&1; true\n",
        },
    )
    by_chroot = _layers(
        dockbuild, ctx, tmp_path / "c.tar", "--executor", "chroot", "--target", "base"
    )
    by_namespace = _layers(
        dockbuild, ctx, tmp_path / "n.tar", "--executor", "namespace", "--target", "base",
        "--no-cache",
    )  # fmt: skip
    assert by_chroot == by_namespace
    assert "s" in by_chroot[1]  # the replaced file
    assert "d/.wh.sub" in by_chroot[2] and "d/link" in by_chroot[2]
    out = tmp_path / "final.tar"
    dockbuild.build(ctx, "-o", f"type=oci,dest={out}", "--executor", "chroot")
    files = layer_files(read_oci(out).layers)
    assert files["seen-left"] == b"1\n"
    assert b"left" not in files["seen-right"]  # the branches do not see each other
    # The final stage is another base: its RUN saw busybox, not the stages' files.
    assert b"No such file" in files["final"]


def test_a_failed_step_leaves_nothing_for_the_next_build(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {"Dockerfile": "FROM busybox\nRUN echo x > /x\nRUN echo junk > /junk && false\n"},
    )
    failed = dockbuild.build(ctx, "--executor", "chroot", check=False)
    assert failed.returncode == 1
    ctx.joinpath("Dockerfile").write_text("FROM busybox\nRUN echo x > /x\nRUN ls / > /ls\n")
    out = tmp_path / "out.tar"
    dockbuild.build(ctx, "-o", f"type=oci,dest={out}", "--executor", "chroot")
    files = layer_files(read_oci(out).layers)
    assert b"junk" not in files["ls"] and b"x\n" in files["ls"]


def test_a_rebuild_takes_the_kept_rootfs_back_to_its_base_and_gives_the_namespace_layers(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox\nARG N\n"
            "RUN echo $N > /etc/n && rm -r /usr && mkdir -p /opt/d && echo $N > /opt/d/f\n"
            "RUN rm -r /opt/d && mkdir /opt/d && echo again$N > /opt/d/g && chmod 700 /opt\n"
            "RUN echo $N >> /etc/passwd && cat /opt/d/g /etc/n > /count\n",
        },
    )
    epoch = {"SOURCE_DATE_EPOCH": "1700000000"}
    dockbuild.build(ctx, "--executor", "chroot", "--build-arg", "N=1", env=epoch)
    assert len(list((dockbuild.root / "rootfs").iterdir())) == 1  # kept for the next build
    out = tmp_path / "c.tar"
    # The steps run again on busybox: the kept rootfs is taken back to it, not copied.
    dockbuild.build(ctx, "--executor", "chroot", "--build-arg", "N=2", "-o", f"type=oci,rewrite-timestamp=true,dest={out}", env=epoch)
    by_namespace = tmp_path / "n.tar"
    dockbuild.build(
        ctx, "--executor", "namespace", "--build-arg", "N=2", "--no-cache",
        "-o", f"type=oci,rewrite-timestamp=true,dest={by_namespace}", env=epoch,
    )  # fmt: skip
    chroot_image, namespace_image = read_oci(out), read_oci(by_namespace)
    assert chroot_image.config["rootfs"] == namespace_image.config["rootfs"]
    files = layer_files(chroot_image.layers)
    assert files["etc/n"] == b"2\n" and files["opt/d/g"] == b"again2\n"
    assert b"\n2\n" in files["etc/passwd"] and b"1\n" not in files["etc/passwd"][-3:]
    dockbuild("prune", "--all", "--force")
    assert not any((dockbuild.root / "rootfs").iterdir())


def test_a_rootfs_left_by_a_killed_build_is_never_reused(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import time

    from clitools import DOCKBUILD

    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN echo x > /x\n"})
    dockbuild.build(ctx, "--executor", "chroot")  # keeps the rootfs of busybox + /x
    ctx.joinpath("Dockerfile").write_text(
        "FROM busybox\nRUN echo x > /x\nRUN echo junk > /junk && sleep 60\n"
    )
    build = subprocess.Popen(
        [DOCKBUILD, "build", "--progress=plain", *dockbuild.base_context, "--executor", "chroot", str(ctx)],
        env=dockbuild.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(600):  # the step has written into the kept rootfs, which it took
            if list(dockbuild.root.glob("tmp/*/chroot-*/root/junk")):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the step never started")
        assert not any((dockbuild.root / "rootfs").iterdir())
    finally:
        os.killpg(build.pid, signal.SIGKILL)
        build.wait()
    ctx.joinpath("Dockerfile").write_text("FROM busybox\nRUN echo x > /x\nRUN ls / > /ls\n")
    out = tmp_path / "out.tar"
    dockbuild.build(ctx, "-o", f"type=oci,dest={out}", "--executor", "chroot")
    files = layer_files(read_oci(out).layers)
    assert b"junk" not in files["ls"] and b"x\n" in files["ls"]
