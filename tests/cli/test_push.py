"""Pushing to real registries through the real CLI: --push, type=image|registry, auth, TLS."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from clitools import DockbuildCLI, write_context
from registry_fixture import Registry, write_docker_config

DOCKERFILE = """\
FROM busybox
RUN echo pushed > /pushed.txt
COPY payload.bin /payload.bin
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    ctx = write_context(tmp_path / "app", {"Dockerfile": DOCKERFILE})
    (ctx / "payload.bin").write_bytes(os.urandom(96_000))  # incompressible: a real chunked upload
    return ctx


def _skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["skopeo", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done


def _manifest(registry: Registry, repo: str, ref: str) -> tuple[str, dict]:
    response = registry.session.get(
        f"{registry.url}/v2/{repo}/manifests/{ref}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                 "application/vnd.docker.distribution.manifest.v2+json"},
        auth=registry._auth(),
        timeout=10,
        verify=str(registry.ca) if registry.ca else True,
    )  # fmt: skip
    response.raise_for_status()
    return response.headers["Docker-Content-Digest"], response.json()


def test_push_is_pulled_back_by_skopeo_and_by_dockbuild_with_identical_digests(
    dockbuild: DockbuildCLI, registry: Registry, app: Path, tmp_path: Path
) -> None:
    name = f"{registry.host}/push/app:1"
    meta = tmp_path / "meta.json"
    dockbuild.build(app, "-t", name, "--push", "--metadata-file", str(meta))
    metadata = json.loads(meta.read_text())
    pushed = metadata["containerimage.digest"]

    digest, manifest = _manifest(registry, "push/app", "1")
    assert digest == pushed
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert metadata["image.name"] == name
    # skopeo verifies every blob against the manifest while copying it out.
    _skopeo("copy", "--src-tls-verify=false", f"docker://{name}", f"oci:{tmp_path / 'copy'}:x")
    inspected = json.loads(_skopeo("inspect", "--tls-verify=false", f"docker://{name}").stdout)
    assert inspected["Digest"] == pushed
    assert inspected["Layers"] == [layer["digest"] for layer in manifest["layers"]]

    # dockbuild pulls it as a base image: the same layers, the same diff_ids.
    child = write_context(tmp_path / "child", {"Dockerfile": f"FROM {name}\n"})
    out = tmp_path / "child.tar"
    dockbuild.build(
        child, "-o", f"type=oci,dest={out}", env={"DOCKBUILD_ROOT": str(tmp_path / "c2")}
    )
    child_layers = json.loads(_skopeo("inspect", f"oci-archive:{out}").stdout)["Layers"]
    assert child_layers == inspected["Layers"]
    child_config = json.loads(_skopeo("inspect", "--config", f"oci-archive:{out}").stdout)
    config = registry.session.get(
        f"{registry.url}/v2/push/app/blobs/{manifest['config']['digest']}", timeout=10
    ).json()
    assert child_config["rootfs"] == config["rootfs"]


def test_blobs_present_are_skipped_and_a_second_repository_mounts_them(
    dockbuild: DockbuildCLI, registry: Registry, app: Path
) -> None:
    first, second = f"{registry.host}/mount/one:1", f"{registry.host}/mount/two:1"
    run = dockbuild.build(app, "-o", f'type=registry,"name={first},{second}"')
    log = run.stderr
    assert "uploaded" in log
    assert log.count("mounted from mount/one") == 4  # busybox, RUN, COPY layers + config
    assert _manifest(registry, "mount/one", "1")[0] == _manifest(registry, "mount/two", "1")[0]

    # A rebuild from the cache is the same image: the layers and the config are there.
    again = dockbuild.build(app, "-t", first, "--push").stderr
    assert again.count("already exists") == 4
    assert again.count(": uploaded") == 0


def test_base_layers_are_mounted_from_the_repository_they_were_pulled_from(
    dockbuild: DockbuildCLI, registry: Registry, busybox_ref: str, tmp_path: Path
) -> None:
    ctx = write_context(
        tmp_path / "cross", {"Dockerfile": f"FROM {busybox_ref}\nRUN echo x > /x.txt\n"}
    )
    name = f"{registry.host}/cross/app:1"
    # Chunks smaller than the busybox layer: uploading it would show as "uploaded in".
    run = dockbuild.build(ctx, "-t", name, "--push", env={"DOCKBUILD_PUSH_CHUNK_SIZE": "16384"})
    _, base = _manifest(registry, "library/busybox", "latest")
    _, pushed = _manifest(registry, "cross/app", "1")
    (base_layer,) = [layer["digest"] for layer in base["layers"]]
    assert pushed["layers"][0]["digest"] == base_layer
    # The registry answered the mount with 201 Created: the layer body was never sent.
    assert f"{base_layer}: mounted from library/busybox" in run.stderr
    assert f"{base_layer}: uploaded" not in run.stderr
    assert run.stderr.count(": uploaded") == 2  # the RUN layer and the config
    _skopeo("copy", "--src-tls-verify=false", f"docker://{name}", f"oci:{tmp_path / 'copy'}:x")


def test_big_blobs_are_uploaded_in_chunks(
    dockbuild: DockbuildCLI, registry: Registry, app: Path, tmp_path: Path
) -> None:
    name = f"{registry.host}/chunked/app:1"
    run = dockbuild.build(app, "-t", name, "--push", env={"DOCKBUILD_PUSH_CHUNK_SIZE": "16384"})
    assert "uploaded in " in run.stderr and " chunks" in run.stderr
    _skopeo("copy", "--src-tls-verify=false", f"docker://{name}", f"oci:{tmp_path / 'copy'}:x")


def test_push_by_digest_pushes_no_tag(
    dockbuild: DockbuildCLI, registry: Registry, app: Path, tmp_path: Path
) -> None:
    meta = tmp_path / "meta.json"
    dockbuild.build(
        app,
        "-o",
        f"type=image,name={registry.host}/bydigest/app:nottag,push=true,push-by-digest=true",
        "--metadata-file",
        str(meta),
    )
    digest = json.loads(meta.read_text())["containerimage.digest"]
    assert _manifest(registry, "bydigest/app", digest)[0] == digest
    tags = registry.session.get(f"{registry.url}/v2/bydigest/app/tags/list", timeout=10).json()
    assert not tags.get("tags")


def test_oci_mediatypes_false_pushes_docker_media_types(
    dockbuild: DockbuildCLI, registry: Registry, app: Path
) -> None:
    name = f"{registry.host}/dockertypes/app:1"
    dockbuild.build(app, "-o", f"type=registry,name={name},oci-mediatypes=false")
    _, manifest = _manifest(registry, "dockertypes/app", "1")
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert {x["mediaType"] for x in manifest["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }


def test_push_with_basic_auth_from_docker_config(
    dockbuild: DockbuildCLI, registry_with_auth: Registry, app: Path, tmp_path: Path
) -> None:
    name = f"{registry_with_auth.host}/auth/app:1"
    denied = dockbuild.build(app, "-t", name, "--push", check=False,
                             env={"DOCKER_CONFIG": str(tmp_path / "empty")})  # fmt: skip
    assert denied.returncode == 3
    assert "unauthorized" in denied.stderr and "Traceback" not in denied.stderr

    config = write_docker_config(tmp_path / "docker", registry_with_auth)
    dockbuild.build(app, "-t", name, "--push", env={"DOCKER_CONFIG": str(config)})
    digest, _ = _manifest(registry_with_auth, "auth/app", "1")
    assert digest.startswith("sha256:")


def test_push_over_tls_trusts_a_ca_from_certs_d(
    dockbuild: DockbuildCLI, registry_tls: Registry, app: Path, tmp_path: Path
) -> None:
    name = f"{registry_tls.host}/tls/app:1"
    untrusted = dockbuild.build(app, "-t", name, "--push", check=False)
    assert untrusted.returncode == 3
    assert "TLS certificate verification failed" in untrusted.stderr

    assert registry_tls.certs_d is not None
    dockbuild.build(app, "-t", name, "--push", env={"DOCKBUILD_CERTS_D": str(registry_tls.certs_d)})
    inspected = _skopeo(
        "inspect", "--cert-dir", str(registry_tls.certs_d / registry_tls.host), f"docker://{name}"
    )
    digest, _ = _manifest(registry_tls, "tls/app", "1")
    assert json.loads(inspected.stdout)["Digest"] == digest

    # registry.insecure=true: TLS without verifying the certificate, as BuildKit does.
    other = f"{registry_tls.host}/tls/insecure:1"
    dockbuild.build(app, "-o", f"type=registry,name={other},registry.insecure=true")
    assert _manifest(registry_tls, "tls/insecure", "1")[0].startswith("sha256:")


def test_push_to_an_insecure_registry_of_config_toml(
    dockbuild: DockbuildCLI, registry_tls: Registry, app: Path, tmp_path: Path
) -> None:
    """`[registry."HOST"] insecure = true` (buildkitd.toml's key) covers pushes as it covers pulls."""
    config = tmp_path / "config.toml"
    config.write_text(f'[registry."{registry_tls.host}"]\ninsecure = true\n')
    name = f"{registry_tls.host}/tls/configured:1"
    dockbuild.build(app, "-t", name, "--push", env={"DOCKBUILD_CONFIG": str(config)})
    assert _manifest(registry_tls, "tls/configured", "1")[0].startswith("sha256:")


def test_push_needs_a_name(dockbuild: DockbuildCLI, app: Path) -> None:
    run = dockbuild.build(app, "--push", check=False)
    assert run.returncode == 2
    assert "--push needs an image name" in run.stderr and "Traceback" not in run.stderr
