"""RUN --mount with the chroot executor (no mount(2)): every type emulated by copies.

The same user-visible behaviour as with the namespace executor where it can be the same
(the shared tests of test_run_mounts run here with ``--executor chroot``), and nothing of
the emulation in a layer, the cache root or the history.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import test_run_mounts as shared
from clitools import DockbuildCLI, layer_files, layer_names, read_oci, write_context

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the chroot executor needs root")


def test_cache_mount_is_copied_in_and_back(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    shared.test_cache_mount_persists_across_builds_and_never_reaches_the_image(
        dockbuild, tmp_path, "chroot"
    )


def test_a_secret_never_appears_in_any_byte_the_build_produces(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    shared.test_a_secret_never_appears_in_any_byte_the_build_produces(dockbuild, tmp_path, "chroot")


def test_ssh_mount_relays_the_agent_into_the_rootfs(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    for tool in ("ssh-agent", "ssh-keygen", "ssh-add"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    tools = shared._tools_context(tmp_path / "tools", ["ssh-add"])
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dockbuild-test-key", "-f", str(key)],
        check=True,
    )
    # No /dev in a chroot step: ssh-add wants /dev/null, made (and removed) by the step.
    ssh_add = "mknod /dev/null c 1 3 && /t/ld.so --library-path /t/lib /t/bin/ssh-add -l"
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox\n"
            f"RUN --mount=type=ssh,id=keys --mount=type=bind,from=tools,target=/t {ssh_add} > /default"
            " ; echo $SSH_AUTH_SOCK > /sock; rm -f /dev/null\n"
            "RUN --mount=type=ssh,id=keys,target=/agent,uid=1000,mode=0660"
            f" --mount=type=bind,from=tools,target=/t SSH_AUTH_SOCK=/agent {ssh_add} > /keys"
            " ; stat -c '%u %a' /agent >> /keys; rm -f /dev/null\n",
        },
    )
    out = tmp_path / "out.tar"
    shared.build_oci(
        dockbuild, ctx, out, "--executor", "chroot", "--build-context", f"tools={tools}",
        "--ssh", f"keys={key}",
    )  # fmt: skip
    layers = read_oci(out).layers
    files = {name: data.decode() for name, data in layer_files(layers).items()}
    assert "dockbuild-test-key (ED25519)" in files["default"]
    assert files["sock"] == "/run/buildkit/ssh_agent.0\n"
    assert "dockbuild-test-key (ED25519)" in files["keys"]
    assert files["keys"].endswith("1000 660\n")
    assert not any(n.startswith(("run", "agent", "t/")) for n in layer_names(layers))


def test_every_mount_type_leaves_the_rootfs_as_it_was(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox AS other\nRUN mkdir /data && echo from-stage > /data/f\n"
            "FROM busybox\nRUN mkdir -p /keep && echo image > /keep/f\n"
            # over an existing directory, with writes: the image's files come back
            "RUN --mount=type=bind,target=/keep,rw cat /keep/hello.txt > /r1"
            " && echo changed > /keep/hello.txt && rm /keep/Dockerfile\n"
            "RUN --mount=type=bind,from=other,source=/data,target=/deep/a/b cat /deep/a/b/f > /r2\n"
            "RUN --mount=type=bind,from=other,source=/data/f,target=/etc/passwd cat /etc/passwd > /r3\n"
            "RUN --mount=type=tmpfs,target=/keep stat -c '%a' /keep > /r4 && ls /keep >> /r4"
            " && echo x > /keep/t\n"
            "RUN --mount=type=cache,target=/c,uid=1000,mode=0710 stat -c '%u %a' /c > /r5"
            " && echo cached > /c/f\n"
            "RUN --mount=type=cache,target=/c,uid=1000,mode=0710 cat /c/f > /r6\n"
            "RUN --mount=type=cache,target=/c,ro echo lost > /c/f; true\n"
            "RUN --mount=type=cache,target=/c cat /c/f > /r7\n"
            "RUN cat /keep/f /keep/hello.txt > /r8 2>&1; head -1 /etc/passwd >> /r8;"
            " ls /deep >> /r8 2>&1; true\n",
            "hello.txt": "hello\n",
        },
    )
    out = tmp_path / "out.tar"
    run = shared.build_oci(dockbuild, ctx, out, "--executor", "chroot")
    layers = read_oci(out).layers
    files = layer_files(layers)
    assert files["r1"] == b"hello\n"
    assert files["r2"] == b"from-stage\n"
    assert files["r3"] == b"from-stage\n"
    assert files["r4"] == b"1777\n"  # an empty directory where /keep was
    assert files["r5"] == b"1000 710\n"
    assert files["r6"] == b"cached\n"  # copied back after the step
    assert files["r7"] == b"cached\n"  # a read-only cache mount's writes are thrown away
    # Every later step sees the image's own /keep and /etc/passwd, and no stub /deep.
    assert files["r8"].startswith(b"image\ncat: can't open '/keep/hello.txt'")
    assert b"root:x:0:0" in files["r8"] and b"No such file" in files["r8"]
    # Each mount step's layer holds only the file the step wrote.
    names = layer_names(layers)
    assert not any(n.startswith(("keep/hello", "keep/t", "deep", "c/", "c")) for n in names), names
    assert [n for n in names if n.startswith("etc")] == [], names
    assert "Traceback" not in run.stderr
    # Nothing of the emulation stays beside the rootfs in the cache root.
    assert not [p for p in dockbuild.root.rglob(".aside-*")]
