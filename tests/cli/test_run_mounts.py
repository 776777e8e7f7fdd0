"""RUN --mount (cache, bind, tmpfs, secret, ssh) through the real CLI, as root."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from clitools import DockbuildCLI, layer_files, layer_names, read_oci, write_context

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="RUN steps need root here")


def step_status(stderr: str, fragment: str) -> str:
    """CACHED, DONE or ERROR for the step whose title contains ``fragment`` (plain progress)."""
    lines = stderr.splitlines()
    number = next(ln.split()[0] for ln in lines if ln.startswith("#") and fragment in ln)
    for line in lines:
        parts = line.split(maxsplit=1)
        if (
            len(parts) == 2
            and parts[0] == number
            and parts[1].split()[0] in ("CACHED", "DONE", "ERROR")
        ):
            return parts[1].split()[0].rstrip(":")
    return ""


def build_oci(dockbuild: DockbuildCLI, ctx: Path, out: Path, *args: str, **kw):  # type: ignore[no-untyped-def]
    return dockbuild.build(ctx, "-o", f"type=oci,dest={out}", *args, **kw)


def test_cache_mount_persists_across_builds_and_never_reaches_the_image(
    dockbuild: DockbuildCLI, tmp_path: Path, executor: str
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox\nARG N\n"
            "RUN --mount=type=cache,target=/var/cache/app echo run-$N >> /var/cache/app/log"
            " && cat /var/cache/app/log > /seen\n"
            "RUN --mount=type=cache,target=/var/cache/app,id=other ls /var/cache/app | wc -l > /other\n",
        },
    )
    out = tmp_path / "out.tar"
    build_oci(dockbuild, ctx, out, "--executor", executor, "--build-arg", "N=1")
    build_oci(dockbuild, ctx, out, "--executor", executor, "--build-arg", "N=2")
    layers = read_oci(out).layers
    files = layer_files(layers)
    assert files["seen"] == b"run-1\nrun-2\n"  # the second build saw the first one's write
    assert files["other"] == b"0\n"  # another id is another cache
    # The cache's contents are not part of the step's cache key: N=1 again is a hit.
    again = build_oci(dockbuild, ctx, out, "--executor", executor, "--build-arg", "N=1")
    assert step_status(again.stderr, "echo run-$N") == "CACHED"
    assert not any(n.startswith("var/cache") for n in layer_names(layers))
    # A namespace (BUILDKIT_CACHE_MOUNT_NS) gives every id a fresh cache.
    build_oci(
        dockbuild,
        ctx,
        out,
        "--executor",
        executor,
        "--build-arg",
        "N=3",
        "--build-arg",
        "BUILDKIT_CACHE_MOUNT_NS=ns1",
    )
    layers = read_oci(out).layers
    seen = [layer.extractfile("seen").read() for layer in layers[1:] if "seen" in layer.getnames()]  # type: ignore[union-attr]
    assert seen == [b"run-3\n"]


def test_cache_mount_from_a_stage_with_owner_mode_and_readonly(
    dockbuild: DockbuildCLI, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox AS seed\nRUN mkdir -p /s/sub && echo seeded > /s/sub/f\n"
            "FROM busybox\n"
            "RUN --mount=type=cache,target=/c,from=seed,source=/s,uid=1000,gid=65534,mode=0710"
            " stat -c '%u %g %a' /c > /out && cat /c/sub/f >> /out\n"
            "RUN --mount=type=cache,target=/c,ro touch /c/x 2>/dev/null; echo $? > /ro\n",
        },
    )
    out = tmp_path / "out.tar"
    build_oci(dockbuild, ctx, out)
    layers = read_oci(out).layers
    files = layer_files(layers)
    assert files["out"] == b"1000 65534 710\nseeded\n"
    assert files["ro"] != b"0\n"


@pytest.mark.parametrize(("sharing", "expected"), [("locked", "serial"), ("private", "apart")])
def test_cache_mount_sharing_between_concurrent_builds(
    dockbuild: DockbuildCLI, tmp_path: Path, sharing: str, expected: str
) -> None:
    # Two builds at once (one cache root), each step holds the cache a while: a second
    # (locked), or until the other step holds its own (private; they meet in a shared cache).
    hold = "sleep 1"
    if sharing == "private":
        hold = (
            "touch /m/$N; i=0; until [ -e /m/$OTHER ] || [ $i -ge 1200 ]; do sleep 0.1; i=$((i+1)); done"
        )
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox\nARG N OTHER\n"
            f"RUN --mount=type=cache,target=/c,sharing={sharing} "
            "--mount=type=cache,target=/m,id=meet,sharing=shared "
            f"ls /c > /before; touch /c/busy-$N; {hold}; rm /c/busy-$N; date +%s%N > /c/end-$N\n",
        },
    )
    warm = write_context(tmp_path / "warm", {"Dockerfile": "FROM busybox\nRUN true\n"})
    dockbuild.build(warm)  # materialise the base image once
    results: dict[str, object] = {}

    def run(n: str) -> None:
        other = "2" if n == "1" else "1"
        results[n] = build_oci(
            dockbuild, ctx, tmp_path / f"{n}.tar", "--build-arg", f"N={n}", "--build-arg", f"OTHER={other}"
        )

    threads = [threading.Thread(target=run, args=(n,)) for n in ("1", "2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    befores = []
    for n in ("1", "2"):
        layers = read_oci(tmp_path / f"{n}.tar").layers
        (before,) = [
            layer.extractfile("before").read().decode()
            for layer in layers[1:]
            if "before" in layer.getnames()
        ]  # type: ignore[union-attr]
        befores.append(before)
    if expected == "serial":
        # locked: the second step starts only after the first one is done with the cache
        assert not any("busy" in b for b in befores), befores
        assert any("end-1" in b or "end-2" in b for b in befores), befores
    else:
        # private: each concurrent step gets its own instance, neither sees the other
        assert not any("busy" in b or "end-1" in b or "end-2" in b for b in befores), befores


def test_bind_mounts_from_context_stage_and_image(
    dockbuild: DockbuildCLI, tmp_path: Path, executor: str
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox AS other\nRUN mkdir /data && echo from-stage > /data/f\n"
            "FROM busybox\nWORKDIR /w\n"
            "RUN --mount=target=ctx cat ctx/hello.txt > /r1; ls ctx > /r1-ls;"
            " touch ctx/new 2>/dev/null; echo $? > /r1-ro\n"
            "RUN --mount=type=bind,from=other,source=/data,target=/m cat /m/f > /r2\n"
            "RUN --mount=type=bind,from=busybox,source=etc/passwd,target=/p head -1 /p > /r3\n"
            "RUN --mount=type=bind,target=/rw,rw echo changed > /rw/hello.txt && touch /rw/new"
            " && cat /rw/hello.txt > /r4\n"
            "RUN --mount=type=bind,target=/rw2 cat /rw2/hello.txt > /r5\n",
            "hello.txt": "hello\n",
            "secret.key": "ignored\n",
            ".dockerignore": "secret.key\n",
        },
    )
    out = tmp_path / "out.tar"
    build_oci(dockbuild, ctx, out, "--executor", executor)
    layers = read_oci(out).layers
    files = layer_files(layers)
    assert files["r1"] == b"hello\n"
    assert files["r1-ls"] == b"Dockerfile\nhello.txt\n"  # .dockerignore applies, as in BuildKit
    assert files["r1-ro"] != b"0\n"  # read-only by default
    assert files["r2"] == b"from-stage\n"
    assert files["r3"].startswith(b"root:")
    assert files["r4"] == b"changed\n"
    assert files["r5"] == b"hello\n"  # rw writes were discarded
    assert (ctx / "hello.txt").read_text() == "hello\n" and not (ctx / "new").exists()
    names = layer_names(layers)
    assert not any(n.startswith(("w/ctx", "m", "p", "rw")) for n in names), names


def test_tmpfs_mount_has_its_size_and_leaves_nothing(
    dockbuild: DockbuildCLI, tmp_path: Path, executor: str
) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox\nRUN --mount=type=tmpfs,target=/scratch/t,size=2m "
            "df -k /scratch/t | tail -1 > /df && echo x > /scratch/t/file\n"
        },  # fmt: skip
    )
    out = tmp_path / "out.tar"
    build_oci(dockbuild, ctx, out, "--executor", executor)
    layers = read_oci(out).layers
    assert layer_names(layers) == ["df"]
    df = layers[1].extractfile("df").read().split()  # type: ignore[union-attr]
    assert df[0] == b"tmpfs" and df[1] == b"2048"


def test_a_secret_never_appears_in_any_byte_the_build_produces(
    dockbuild: DockbuildCLI, tmp_path: Path, executor: str
) -> None:
    secret = "dockbuild-planted-secret-" + os.urandom(8).hex()
    (tmp_path / "token.txt").write_text(secret)
    # The RUN compares the secret with a context file, so no ARG or command holds it.
    ctx = write_context(tmp_path / "ctx", {"expect": secret})
    out = tmp_path / "out.tar"
    ctx.joinpath("Dockerfile").write_text(
        "FROM busybox\n"
        "RUN --mount=type=secret,id=token --mount=target=/x,source=expect"
        ' test "$(cat /run/secrets/token)" = "$(cat /x)" && stat -c \'%a %u\' /run/secrets/token > /file-ok\n'
        "RUN --mount=type=secret,id=envtok,env=TOKEN,target=/etc/tok,mode=0440,uid=1000"
        " --mount=target=/x,source=expect"
        ' test "$TOKEN" = "$(cat /x)" && stat -c \'%a %u\' /etc/tok > /env-ok\n'
        "RUN --mount=type=secret,id=absent ls /run/secrets > /absent 2>&1; true\n"
        # A step that prints the secret: masked in the progress output and the record.
        'RUN --mount=type=secret,id=token echo "the token: $(cat /run/secrets/token)"\n'
    )
    run = build_oci(
        dockbuild, ctx, out, "--executor", executor,
        "--secret", f"id=token,src={tmp_path / 'token.txt'}",
        "--secret", "id=envtok,env=MY_SECRET_VAR",
        env={"MY_SECRET_VAR": secret},
    )  # fmt: skip
    image = read_oci(out)
    config, history, layers, blobs = image.config, image.history, image.layers, image.raw
    files = {
        m.name: layers[i].extractfile(m).read()
        for i in range(1, len(layers))
        for m in layers[i].getmembers()
        if m.isfile()
    }  # type: ignore[union-attr]
    assert files["file-ok"] == b"400 0\n"
    assert files["env-ok"] == b"440 1000\n"
    assert b"No such file" in files["absent"]  # not required, not given: no mount
    assert not any(n.startswith(("run", "etc/tok")) for n in layer_names(layers))
    needle = secret.encode()
    assert needle not in json.dumps(config).encode() and needle not in json.dumps(history).encode()
    assert not any(needle in blob for blob in blobs)
    assert needle not in run.stdout and secret not in run.stderr
    assert "the token: ****" in run.stderr
    # The build's record (the cache root's history/, scanned below too) names the
    # secrets by id, never by source or value.
    record = json.loads(dockbuild("history", "inspect", "--format", "json").out)
    assert record["secrets"] == ["token", "envtok"] and record["status"] == "completed"
    shown = dockbuild("history", "inspect").out + dockbuild("history", "logs").out
    assert secret not in shown and "token.txt" not in shown and "MY_SECRET_VAR" not in shown
    assert "the token: ****" in shown
    assert needle not in gzip.decompress(dockbuild("history", "export").stdout)
    assert any((dockbuild.root / "history").iterdir())
    for path in dockbuild.root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert needle not in data, path
            if data[:2] == b"\x1f\x8b":
                assert needle not in gzip.decompress(data), path
    # A required secret that was not given is a clear error.
    ctx.joinpath("Dockerfile").write_text(
        "FROM busybox\nRUN --mount=type=secret,id=nope,required true\n"
    )
    failed = build_oci(dockbuild, ctx, out, "--executor", executor, check=False)
    assert failed.returncode == 1
    assert "secret nope not found" in failed.stderr and "Traceback" not in failed.stderr


def _tools_context(root: Path, binaries: list[str]) -> Path:
    """Host binaries and their shared libraries, to run inside busybox via the loader."""
    (root / "bin").mkdir(parents=True)
    (root / "lib").mkdir()
    loader = None
    for binary in binaries:
        path = shutil.which(binary)
        if path is None:
            pytest.skip(f"{binary} is not installed (.ci/install-deps installs it)")
        shutil.copy2(path, root / "bin" / binary)
        ldd = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
        for line in ldd.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
                shutil.copy2(parts[2], root / "lib" / parts[0])
            elif parts and parts[0].startswith("/") and "ld-linux" in parts[0]:
                loader = parts[0]
    assert loader is not None
    shutil.copy2(loader, root / "ld.so")
    return root


def test_ssh_mount_forwards_the_agent_and_key_files(
    dockbuild: DockbuildCLI, tmp_path: Path, executor: str
) -> None:
    for tool in ("ssh-agent", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    tools = _tools_context(tmp_path / "tools", ["ssh-add"])
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dockbuild-test-key", "-f", str(key)],
        check=True,
    )
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(500):
            if sock.exists():
                break
            threading.Event().wait(0.01)
        subprocess.run(
            ["ssh-add", str(key)], env={"SSH_AUTH_SOCK": str(sock)}, check=True, capture_output=True
        )
        ssh_add = "/t/ld.so --library-path /t/lib /t/bin/ssh-add -l"
        ctx = write_context(
            tmp_path / "ctx",
            {
                "Dockerfile": "FROM busybox\n"
                f"RUN --mount=type=ssh --mount=type=bind,from=tools,target=/t {ssh_add} > /default"
                " && echo $SSH_AUTH_SOCK > /sock\n"
                f"RUN --mount=type=ssh,id=sock --mount=type=bind,from=tools,target=/t {ssh_add} > /sock-id\n"
                "RUN --mount=type=ssh,id=keys,target=/agent,uid=1000,mode=0660"
                f" --mount=type=bind,from=tools,target=/t SSH_AUTH_SOCK=/agent {ssh_add} > /keys"
                " && stat -c '%u %a' /agent >> /keys\n",
            },
        )
        out = tmp_path / "out.tar"
        build_oci(
            dockbuild, ctx, out, "--executor", executor, "--build-context", f"tools={tools}",
            "--ssh", "default", "--ssh", f"keys={key}", "--ssh", f"sock={sock}",
            env={"SSH_AUTH_SOCK": str(sock)},
        )  # fmt: skip
    finally:
        agent.kill()
        agent.wait()
    layers = read_oci(out).layers
    files = {name: data.decode() for name, data in layer_files(layers).items()}
    assert "dockbuild-test-key (ED25519)" in files["default"]
    assert files["sock"] == "/run/buildkit/ssh_agent.0\n"
    assert "dockbuild-test-key (ED25519)" in files["sock-id"]  # --ssh ID=SOCKET
    assert "dockbuild-test-key (ED25519)" in files["keys"]
    assert files["keys"].endswith("1000 660\n")
    assert not any(n.startswith(("run", "agent", "t/")) for n in layer_names(layers))
    # Without --ssh, a required ssh mount is a clear error.
    ctx.joinpath("Dockerfile").write_text("FROM busybox\nRUN --mount=type=ssh,required true\n")
    failed = build_oci(
        dockbuild, ctx, out, "--executor", executor, check=False, env={"SSH_AUTH_SOCK": ""}
    )
    assert failed.returncode == 1 and "--ssh default" in failed.stderr


def test_secret_source_is_detected_as_buildx_does(dockbuild: DockbuildCLI, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM busybox\nRUN --mount=type=secret,id=DB_TOKEN,required cat /run/secrets/DB_TOKEN > /got\n"
        },
    )
    out = tmp_path / "out.tar"
    # An environment variable named like the id wins over a file of that name.
    (tmp_path / "DB_TOKEN").write_text("from-file")
    build_oci(
        dockbuild,
        ctx,
        out,
        "--secret",
        "id=DB_TOKEN",
        "--no-cache",
        cwd=tmp_path,
        env={"DB_TOKEN": "from-env"},
    )
    layers = read_oci(out).layers
    assert layers[-1].extractfile("got").read() == b"from-env"  # type: ignore[union-attr]
    build_oci(dockbuild, ctx, out, "--secret", "id=DB_TOKEN", "--no-cache", cwd=tmp_path)
    layers = read_oci(out).layers
    assert layers[-1].extractfile("got").read() == b"from-file"  # type: ignore[union-attr]
    # Neither: a clear error before anything runs.
    failed = build_oci(dockbuild, ctx, out, "--secret", "id=NOPE_X", check=False, cwd=tmp_path)
    assert failed.returncode == 1
    assert "secret NOPE_X: no file NOPE_X and no environment variable NOPE_X" in failed.stderr
    failed = build_oci(dockbuild, ctx, out, "--allow", "network.everything", check=False)
    assert failed.returncode == 1 and "invalid --allow" in failed.stderr
