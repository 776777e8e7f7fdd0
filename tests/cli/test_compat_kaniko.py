"""kaniko's executor command lines through `dockbuild-kaniko` (/kaniko/executor in the
image), against a real registry demanding basic auth: what is pushed, cached and written
is read back by skopeo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from clitools import Run, write_context
from compat_cases import KANIKO_CACHE, KANIKO_PUSH, KANIKO_TAR, SCRIPTS, Case, files
from registry_fixture import Registry, make_busybox_layout, write_docker_config

EXECUTOR = str(Path(sys.executable).with_name(SCRIPTS["kaniko"]))


@pytest.fixture(scope="module")
def private(registry_with_auth: Registry, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """The auth registry, holding library/busybox:latest."""
    layout = make_busybox_layout(tmp_path_factory.mktemp("kaniko-busybox") / "busybox")
    registry_with_auth.push_layout(layout, "library/busybox:latest")
    return registry_with_auth


@pytest.fixture
def job(tmp_path: Path, private: Registry) -> dict[str, str]:
    """A CI job's workspace: the project, an output directory, /kaniko/.docker/config.json."""
    context = write_context(tmp_path / "project", files(private.host))
    out = tmp_path / "out"
    out.mkdir()
    docker_config = write_docker_config(tmp_path / "kaniko" / ".docker", private)
    return {"registry": private.host, "context": str(context), "out": str(out),
            "root": str(tmp_path / "cache"), "docker_config": str(docker_config)}  # fmt: skip


def executor(*args: str, job: dict[str, str], root: str | None = None) -> Run:
    env = dict(os.environ, DOCKBUILD_ROOT=root or job["root"], DOCKER_CONFIG=job["docker_config"])
    env.pop("DOCKBUILD_DEBUG", None)
    proc = subprocess.run([EXECUTOR, *args], env=env, capture_output=True, timeout=300)
    return Run(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


def run_case(case: Case, job: dict[str, str], *extra: str, root: str | None = None) -> Run:
    done = executor(*case.argv(**job), *extra, job=job, root=root)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


def inspect(registry: Registry, name: str, *flags: str) -> dict:
    done = subprocess.run(
        ["skopeo", "inspect", *flags, "--tls-verify=false", "--creds",
         f"{registry.username}:{registry.password}", f"docker://{name}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_gitlab_push_uses_docker_config_credentials_and_pushes_every_destination(
    job: dict[str, str], private: Registry
) -> None:
    run_case(KANIKO_PUSH, job)
    digest = Path(job["out"], "digest").read_text()
    assert digest.startswith("sha256:") and "\n" not in digest  # as kaniko writes it
    for tag in ("v1.0.0", "latest"):
        assert inspect(private, f"{private.host}/group/project:{tag}")["Digest"] == digest
    # The build arg reached RUN: the pushed image holds it.
    copy = Path(job["out"], "copy")
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--src-creds",
                    f"{private.username}:{private.password}",
                    f"docker://{private.host}/group/project:v1.0.0", f"oci:{copy}:x"],
                   check=True, capture_output=True)  # fmt: skip
    assert _file_in_layout(copy, "greeting.txt") == b"hi from RUN\n"


def test_gitlab_push_without_credentials_is_refused_by_the_registry(
    job: dict[str, str], tmp_path: Path
) -> None:
    job = dict(job, docker_config=str(tmp_path / "empty"))
    done = executor(*KANIKO_PUSH.argv(**job), job=job)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert not Path(job["out"], "digest").exists()


def test_cache_repo_is_filled_and_a_fresh_runner_builds_from_it(
    job: dict[str, str], private: Registry, tmp_path: Path
) -> None:
    first = run_case(KANIKO_CACHE, job)
    for flag in ("--snapshot-mode", "--use-new-run", "--cleanup", "--cache-ttl"):
        assert f"note: ignoring {flag}:" in first.stderr
    pushed = inspect(private, f"{private.host}/group/cached:main")["Layers"]
    cache = inspect(private, f"{private.host}/group/cached/cache:buildcache", "--raw")
    assert cache["layers"]  # the cache manifest, its layers beside the image's
    # Another runner, an empty local cache: the RUN step comes from the cache repository.
    second = run_case(KANIKO_CACHE, job, root=str(tmp_path / "other-cache"))
    (step,) = {line.split()[0] for line in second.stderr.splitlines() if "RUN echo" in line}
    assert f"{step} CACHED" in second.stderr.splitlines(), second.stderr
    assert inspect(private, f"{private.host}/group/cached:main")["Layers"] == pushed


def test_no_push_alone_builds_reports_the_digest_and_warns_of_nothing(
    job: dict[str, str], private: Registry
) -> None:
    """kaniko's --no-push without a tarball is a build check: the image is kept nowhere,
    as asked, so dockbuild's advice for a type=image output kept nowhere is not printed."""
    argv = list(KANIKO_TAR.argv(**job))
    del argv[argv.index("--tar-path") : argv.index("--tar-path") + 2]
    done = executor(*argv, job=job)
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr and "Traceback" not in done.stderr
    assert (Path(job["out"]) / "digest").read_text().startswith("sha256:")
    assert not _tags(private, "group/project") & {"mr-1"}  # nothing was pushed


def test_no_push_writes_the_tarball_and_digest_files_of_the_image_a_push_gives(
    job: dict[str, str], private: Registry
) -> None:
    out = Path(job["out"])
    built = run_case(KANIKO_TAR, job)
    assert "WARNING" not in built.stderr  # the tarball is the output: nothing kept "nowhere"
    digest = (out / "digest").read_text()
    name = f"{private.host}/group/project"
    assert (out / "image-name").read_text() == f"{name}@{digest}\n"
    assert (out / "image-name-tag").read_text() == f"{name}:mr-1@{digest}\n"
    # A docker-archive tarball tagged with the destination, as kaniko writes it.
    with tarfile.open(out / "image.tar") as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == [f"{name}:mr-1"]
    archived = subprocess.run(["skopeo", "inspect", f"docker-archive:{out / 'image.tar'}"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(archived.stdout)["Layers"]
    assert not _tags(private, "group/project") & {"mr-1"}  # nothing was pushed
    # The same job with the push: the registry holds the digest the files named.
    argv = [a for a in KANIKO_TAR.argv(**job) if a != "--no-push"]
    pushed_dir = out / "pushed"
    pushed_dir.mkdir()
    argv[argv.index(str(out / "digest"))] = str(pushed_dir / "digest")
    done = executor(*argv, job=job)
    assert done.returncode == 0, done.stderr
    assert inspect(private, f"{name}:mr-1")["Digest"] == digest == (pushed_dir / "digest").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--destination", "x/y", "--bogus-flag=1"], "unknown flag: --bogus-flag"),
        (["--destination", "x/y", "--snapshotmode", "full"], "unknown flag: --snapshotmode"),
        (["--no-push=maybe"], 'invalid argument "maybe" for "--no-push"'),
        (["--context"], "flag needs an argument: --context"),
        (["--context", "."], "you must provide --destination, or use --no-push"),
        (["--no-push", "--bucket", "b"], "--bucket is not supported"),
        (["--no-push", "--context", "s3://bucket/ctx.tar.gz"], "--context s3:// is not supported"),
        (["--no-push", "--verbosity", "loud"], "invalid --verbosity 'loud'"),
        (["--no-push", "--cache-ttl", "two weeks"], 'invalid argument "two weeks" for "--cache-ttl"'),
    ],
)
def test_bad_command_lines_exit_2_naming_the_flag(
    job: dict[str, str], args: list[str], message: str
) -> None:
    done = executor(*args, job=job)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_tar_context_with_equals_and_shorthand_forms(job: dict[str, str], tmp_path: Path) -> None:
    """`--context tar://...`, `-f`, `--no-push=true`, `--tar-path=...`, `-v debug` as pflag reads them."""
    archive = tmp_path / "context.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(job["context"], arcname=".")
    out = Path(job["out"])
    run_case(Case("tar-context", "kaniko", (
        f"--context=tar://{archive}", "-f", "Dockerfile", "--no-push=true",
        f"--tar-path={out}/t.tar", "-d", f"{job['registry']}/x/y:z", "-v", "debug",
        "--label", "org.example=1", "--force", "--single-snapshot",
    )), job)  # fmt: skip
    archived = subprocess.run(["skopeo", "inspect", "--config", f"docker-archive:{out / 't.tar'}"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    config = json.loads(archived.stdout)
    assert config["config"]["Labels"]["org.example"] == "1"
    base = inspect_layers(job)
    assert len(config["rootfs"]["diff_ids"]) == base + 1  # --single-snapshot: one layer added


def inspect_layers(job: dict[str, str]) -> int:
    """How many layers the base image has."""
    done = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--creds", "tester:s3cret-pw", "--config",
         f"docker://{job['registry']}/library/busybox:latest"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return len(json.loads(done.stdout)["rootfs"]["diff_ids"])


def test_reproducible_gives_one_digest_from_two_runners_and_epoch_0_times(
    job: dict[str, str], tmp_path: Path
) -> None:
    digests = []
    for n in (1, 2):
        os.utime(Path(job["context"], "payload.txt"), (1_000_000 * n, 1_000_000 * n))
        out = tmp_path / f"r{n}"
        run_case(Case("reproducible", "kaniko", (
            "--context", job["context"], "--no-push", "--reproducible",
            "--digest-file", f"{out}.digest", "--tar-path", f"{out}.tar",
        )), job, root=str(tmp_path / f"root{n}"))  # fmt: skip
        digests.append(Path(f"{out}.digest").read_text())
    assert digests[0] == digests[1]
    done = subprocess.run(["skopeo", "inspect", "--config", f"docker-archive:{tmp_path / 'r1.tar'}"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    config = json.loads(done.stdout)
    assert config["created"] == "1970-01-01T00:00:00Z"


def _tags(registry: Registry, repo: str) -> set[str]:
    response = registry.session.get(f"{registry.url}/v2/{repo}/tags/list", auth=registry._auth(), timeout=10)
    return set(response.json().get("tags") or []) if response.ok else set()


def _file_in_layout(layout: Path, name: str) -> bytes:
    from clitools import _decompress

    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    found = b""
    for layer in manifest["layers"]:
        data = _decompress((layout / "blobs/sha256" / layer["digest"][7:]).read_bytes())
        import io

        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if member.name.lstrip("./") == name:
                    found = tar.extractfile(member).read()  # type: ignore[union-attr]
    return found


def test_registry_mirror_serves_docker_hub_names(job: dict[str, str], private: Registry) -> None:
    """`FROM busybox` (Docker Hub) pulled from `--registry-mirror`: no internet needed."""
    Path(job["context"], "Dockerfile").write_text("FROM busybox:latest\nRUN echo mirrored > /m.txt\n")
    out = Path(job["out"])
    run_case(Case("mirror", "kaniko", (
        "--context", job["context"], "--no-push", "--registry-mirror", private.host,
        "--tar-path", f"{out}/m.tar",
    )), job)  # fmt: skip
    assert (out / "m.tar").stat().st_size > 0


def test_tls_registry_needs_skip_tls_verify_or_its_certificate(
    job: dict[str, str], registry_tls: Registry
) -> None:
    dest = f"{registry_tls.host}/tls/app:1"
    refused = executor("--context", job["context"], "--destination", dest, job=job)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    run_case(Case("skip-tls", "kaniko", ("--context", "{context}", "--destination", dest, "--skip-tls-verify")), job)
    assert registry_tls.ca is not None
    run_case(Case("ca", "kaniko", (
        "--context", "{context}", "--destination", f"{registry_tls.host}/tls/app:2",
        "--registry-certificate", f"{registry_tls.host}={registry_tls.ca}",
        "--digest-file", "{out}/tls-digest",
    )), job)  # fmt: skip
    done = subprocess.run(["skopeo", "inspect", "--cert-dir", str(registry_tls.certs_d / registry_tls.host),
                           f"docker://{registry_tls.host}/tls/app:2"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(done.stdout)["Digest"] == Path(job["out"], "tls-digest").read_text()


def test_git_context_is_cloned_over_http_with_git_pull_method(
    job: dict[str, str], tmp_path: Path, private: Registry
) -> None:
    """`--context git://HOST/REPO.git#REF` as kaniko clones it (GIT_PULL_METHOD=http), served
    here as a plain-HTTP git repository."""
    import functools
    import http.server
    import threading

    work = write_context(tmp_path / "repo", files(private.host))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=work, check=True)
    subprocess.run([*git, "add", "."], cwd=work, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=work, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(tmp_path / "www/r.git")], check=True)
    subprocess.run(["git", "update-server-info"], cwd=tmp_path / "www/r.git", check=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"127.0.0.1:{server.server_address[1]}"
        env = dict(os.environ, GIT_PULL_METHOD="http", DOCKBUILD_ROOT=job["root"], DOCKER_CONFIG=job["docker_config"])
        out = Path(job["out"], "git.tar")
        proc = subprocess.run([EXECUTOR, "--context", f"git://{host}/r.git#refs/heads/main", "--no-push",
                               "--tar-path", str(out)], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_size > 0
    finally:
        server.shutdown()
        server.server_close()
