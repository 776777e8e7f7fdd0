"""buildctl-daemonless.sh command lines from BuildKit's README through `dockbuild-buildctl`
(buildctl and buildctl-daemonless.sh in the image), against a real registry: what is
pushed, cached and written is read back by skopeo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import Run, read_oci, write_context
from compat_cases import BUILDCTL_CACHE, BUILDCTL_LOCAL, BUILDCTL_PUSH, SCRIPTS, Case, files
from registry_fixture import Registry

BUILDCTL = str(Path(sys.executable).with_name(SCRIPTS["buildctl"]))


@pytest.fixture
def job(tmp_path: Path, registry: Registry, busybox_ref: str) -> dict[str, str]:
    context = write_context(tmp_path / "work", files(registry.host))
    out = tmp_path / "out"
    out.mkdir()
    return {"registry": registry.host, "context": str(context), "out": str(out), "root": str(tmp_path / "cache")}


def buildctl(*args: str, job: dict[str, str], root: str | None = None, program: str = BUILDCTL) -> Run:
    env = dict(os.environ, DOCKBUILD_ROOT=root or job["root"])
    env.pop("DOCKBUILD_DEBUG", None)
    proc = subprocess.run([program, *args], env=env, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    return Run(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


def run_case(case: Case, job: dict[str, str], *extra: str, **kw: str) -> Run:
    done = buildctl(*case.argv(**job), *extra, job=job, **kw)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


def inspect(name: str, *flags: str) -> dict:
    done = subprocess.run(["skopeo", "inspect", *flags, "--tls-verify=false", f"docker://{name}"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_readme_push_pushes_the_image_and_the_metadata_file_names_its_digest(job: dict[str, str]) -> None:
    meta = Path(job["out"], "metadata.json")
    run_case(BUILDCTL_PUSH, job, "--metadata-file", str(meta))
    pushed = inspect(BUILDCTL_PUSH.pushed(**job))
    metadata = json.loads(meta.read_text())
    assert pushed["Digest"] == metadata["containerimage.digest"]
    assert metadata["image.name"] == BUILDCTL_PUSH.pushed(**job)


def test_readme_registry_cache_is_exported_then_imported_by_a_fresh_builder(
    job: dict[str, str], tmp_path: Path
) -> None:
    # The first build imports a cache that is not there yet, as a first pipeline does.
    run_case(BUILDCTL_CACHE, job)
    layers = inspect(BUILDCTL_CACHE.pushed(**job))["Layers"]
    assert inspect(f"{job['registry']}/bk/myrepo:buildcache", "--raw")["layers"]
    second = run_case(BUILDCTL_CACHE, job, "--progress=plain", root=str(tmp_path / "fresh"))
    (step,) = {line.split()[0] for line in second.stderr.splitlines() if "RUN echo" in line}
    assert f"{step} CACHED" in second.stderr.splitlines(), second.stderr
    assert inspect(BUILDCTL_CACHE.pushed(**job))["Layers"] == layers


def test_readme_local_output_through_buildctl_daemonless_sh_with_daemon_flags_ignored(
    job: dict[str, str], tmp_path: Path
) -> None:
    """buildctl-daemonless.sh takes buildctl's arguments; --addr and --trace mean nothing here."""
    daemonless = tmp_path / "bin" / "buildctl-daemonless.sh"
    daemonless.parent.mkdir()
    daemonless.symlink_to(BUILDCTL)
    done = run_case(Case("local", "buildctl", ("--addr", "unix:///run/buildkit/buildkitd.sock",
                                               *BUILDCTL_LOCAL.args, "--trace", "{out}/trace.json")),
                    job, program=str(daemonless))  # fmt: skip
    assert "note: ignoring --addr:" in done.stderr
    assert "note: ignoring --trace:" in done.stderr
    rootfs = Path(job["out"], "rootfs")
    assert (rootfs / "greeting.txt").read_text() == "hello from RUN\n"
    assert (rootfs / "payload.txt").read_text() == "payload\n"
    assert (rootfs / "bin" / "busybox").exists()


def test_gateway_frontend_opts_and_named_contexts(job: dict[str, str], tmp_path: Path) -> None:
    """`--frontend gateway.v0 --opt source=docker/dockerfile`, `--opt target=`, `--opt
    filename=`, `--opt context:NAME=local:NAME`, `--opt no-cache=`, `-o type=oci,dest=`."""
    extra = write_context(tmp_path / "extra", {"extra.txt": "from a named context\n"})
    dockerfiles = write_context(tmp_path / "dockerfiles", {"app.Dockerfile": (
        f"FROM {job['registry']}/library/busybox:latest AS base\n"
        "RUN echo base > /base.txt\n"
        "FROM base AS final\n"
        "COPY --from=extra extra.txt /extra.txt\n"
        "FROM final AS unused\nRUN false\n"
    )})  # fmt: skip
    out = Path(job["out"], "image.tar")
    run_case(Case("gateway", "buildctl", (
        "build", "--frontend=gateway.v0", "--opt", "source=docker/dockerfile:1",
        "--local", "context={context}", "--local", f"dockerfile={dockerfiles}",
        "--local", f"extra={extra}", "--opt", "context:extra=local:extra",
        "--opt", "filename=app.Dockerfile", "--opt", "target=final", "--opt", "no-cache=",
        "--output", f"type=oci,dest={out}",
    )), job)  # fmt: skip
    subprocess.run(["skopeo", "inspect", f"oci-archive:{out}"], capture_output=True, check=True)
    image = read_oci(out)
    names = {m.name.lstrip("./"): layer for layer in image.layers for m in layer.getmembers()}
    assert names["extra.txt"].extractfile("extra.txt").read() == b"from a named context\n"  # type: ignore[union-attr]
    assert "base.txt" in names


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build", "--frontend", "dockerfile.v0", "--bogus"], "unknown flag: --bogus"),
        (["--bogus-global", "build"], "unknown flag: --bogus-global"),
        (["du"], "`dockbuild du`"),
        (["prune", "--all"], "`dockbuild prune`"),
        (["debug", "workers"], "`dockbuild debug`"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["build", "--local", "context=."], "--frontend is required"),
        (["build", "--frontend", "gateway.v0", "--opt", "source=example/frontend", "--local", "context=."],
         "other frontend images are not supported"),
        (["build", "--frontend", "dockerfile.v0", "--local", "dockerfile=."], "--local context=DIR is required"),
        (["build", "--frontend", "dockerfile.v0", "--local", "context=.", "--opt", "attest:sbom="],
         "--opt attest:sbom is not supported"),
        (["build", "--frontend", "dockerfile.v0", "--local", "context=.", "--opt", "bogus=1"],
         "--opt bogus: unknown frontend option"),
        (["build", "--frontend", "dockerfile.v0", "--source-policy-file", "p.json"],
         "--source-policy-file is not supported"),
    ],
)
def test_bad_command_lines_and_other_subcommands_exit_2_naming_what_to_use(
    job: dict[str, str], args: list[str], message: str
) -> None:
    done = buildctl(*args, job=job)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_secret_ssh_free_build_with_a_local_cache_exported_then_imported(
    job: dict[str, str], tmp_path: Path
) -> None:
    """`--secret id=,src=` reaches RUN --mount=type=secret; `--export-cache type=local,dest=`
    and `--import-cache type=local,src=` carry the steps to a fresh builder."""
    Path(job["context"], "Dockerfile").write_text(
        f"FROM {job['registry']}/library/busybox:latest\n"
        'RUN --mount=type=secret,id=token test "$(cat /run/secrets/token)" = s3cr3t && echo ok > /checked\n'
    )
    token = tmp_path / "token"
    token.write_text("s3cr3t")
    cache = tmp_path / "bk-cache"
    base = ("build", "--frontend", "dockerfile.v0", "--local", "context={context}",
            "--local", "dockerfile={context}", "--secret", f"id=token,src={token}", "--progress", "plain")  # fmt: skip
    run_case(Case("secret", "buildctl", (*base, "--output", "type=local,dest={out}/one",
                                         "--export-cache", f"type=local,dest={cache},mode=max")), job)  # fmt: skip
    assert Path(job["out"], "one", "checked").read_text() == "ok\n"
    second = run_case(Case("import", "buildctl", (*base, "--output", "type=local,dest={out}/two",
                                                  "--import-cache", f"type=local,src={cache}")),
                      job, root=str(tmp_path / "fresh"))  # fmt: skip
    (step,) = {line.split()[0] for line in second.stderr.splitlines() if "RUN --mount" in line}
    assert f"{step} CACHED" in second.stderr.splitlines(), second.stderr
    assert Path(job["out"], "two", "checked").read_text() == "ok\n"
