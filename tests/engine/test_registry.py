"""The registry client against a real docker-registry, and a stub for what it cannot show.

The stub (a small threaded HTTP server) plays the parts docker-registry has no switch
for: a bearer token service, a redirect to blob storage on another host, transient
5xx answers, schema 1 manifests and a lying Docker-Content-Digest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from registry_fixture import (
    Registry,
    attestation_entry,
    oci_index,
    tiny_image,
    write_docker_config,
)

from dockbuild.engine.registry.auth import (
    Challenge,
    lookup_credentials,
    parse_www_authenticate,
)
from dockbuild.engine.registry.client import Descriptor, RegistryClient
from dockbuild.engine.registry.reference import parse_reference
from dockbuild.errors import DigestMismatchError, RegistryError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RegistryClient]:
    """A client with an empty docker config (no stray credentials from the machine)."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    with RegistryClient(backoff=0.01) as c:
        yield c


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------------------
# Against docker-registry.


def test_resolve_busybox_verifies_manifest_and_config(
    client: RegistryClient, busybox_ref: str, busybox_layout: Path
) -> None:
    image = client.resolve(parse_reference(busybox_ref))
    layout_index = json.loads((busybox_layout / "index.json").read_bytes())
    assert image.manifest_digest == layout_index["manifests"][0]["digest"]
    assert sha256(image.manifest) == image.manifest_digest
    assert image.manifest_media_type == OCI_MANIFEST
    assert sha256(image.config) == image.config_digest
    assert image.platform == "linux/amd64"
    assert json.loads(image.config)["config"]["Cmd"] == ["sh"]
    assert [layer.media_type for layer in image.layers] == [
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ]
    assert str(image.ref) == busybox_ref


def test_resolve_by_digest_gives_the_same_image(client: RegistryClient, busybox_ref: str) -> None:
    by_tag = client.resolve(parse_reference(busybox_ref))
    pinned = parse_reference(busybox_ref).with_digest(by_tag.manifest_digest)
    assert client.resolve(pinned).manifest == by_tag.manifest


def test_fetch_blob_writes_the_verified_layer(
    client: RegistryClient, busybox_ref: str, busybox_layout: Path, tmp_path: Path
) -> None:
    ref = parse_reference(busybox_ref)
    [layer] = client.resolve(ref).layers
    dest = tmp_path / "blobs" / "layer"
    client.fetch_blob(ref, layer, dest)
    data = dest.read_bytes()
    assert sha256(data) == layer.digest and len(data) == layer.size
    assert data == (busybox_layout / "blobs/sha256" / layer.digest[7:]).read_bytes()
    assert leftovers(dest.parent) == ["layer"]


def test_any_manifest_and_small_blob_can_be_fetched_verified(
    client: RegistryClient, registry: Registry
) -> None:
    """What a cache import reads: a manifest whose config is not an image config."""
    config = json.dumps({"dockbuild.cache.v1": {"records": []}}).encode()
    config_digest = registry.put_blob("cache/app", config)
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
         "config": {"mediaType": "application/vnd.dockbuild.cache.config.v1+json",
                    "digest": config_digest, "size": len(config)}}
    ).encode()  # fmt: skip
    digest = registry.put_manifest("cache/app", "buildcache", manifest, OCI_MANIFEST)
    ref = parse_reference(f"{registry.host}/cache/app:buildcache")
    assert client.fetch_manifest(ref) == (manifest, OCI_MANIFEST, digest)
    desc = Descriptor(OCI_MANIFEST, digest, len(manifest))
    assert client.fetch_manifest(ref, desc)[0] == manifest
    assert client.fetch_blob_bytes(ref, Descriptor("x", config_digest, len(config))) == config
    with pytest.raises(DigestMismatchError):
        client.fetch_manifest(ref, Descriptor(OCI_MANIFEST, digest, len(manifest) + 1))
    with pytest.raises(RegistryError, match="more than the 10"):
        client.fetch_blob_bytes(ref, Descriptor("x", config_digest, len(config)), limit=10)


def test_unknown_tag_says_manifest_unknown(
    client: RegistryClient, registry: Registry, busybox_ref: str
) -> None:
    with pytest.raises(RegistryError) as caught:
        client.resolve(parse_reference(f"{registry.host}/library/busybox:nope"))
    assert caught.value.message == f"{registry.host}/library/busybox:nope: manifest unknown"


def test_unknown_repository_is_reported(client: RegistryClient, registry: Registry) -> None:
    with pytest.raises(RegistryError) as caught:
        client.resolve(parse_reference(f"{registry.host}/foo:1"))
    assert caught.value.message.startswith(f"{registry.host}/foo:1: ")
    assert "unknown" in caught.value.message


def test_tampered_blob_is_rejected_and_nothing_is_left(
    client: RegistryClient, registry: Registry, tmp_path: Path
) -> None:
    # A layer no other test uses: blobs are shared between repositories.
    image = tiny_image("amd64", content=os.urandom(64).hex().encode())
    image.push(registry, "tamper/blob", "v1")
    stored = registry.blob_data_path(image.layer_digest)
    original = stored.read_bytes()
    stored.write_bytes(original[:-9] + bytes(9))  # same size, different bytes

    ref = parse_reference(f"{registry.host}/tamper/blob:v1")
    [layer] = client.resolve(ref).layers
    dest = tmp_path / "out" / "layer"
    with pytest.raises(DigestMismatchError) as caught:
        client.fetch_blob(ref, layer, dest)
    assert f"expected {image.layer_digest}" in caught.value.message
    assert f"got {sha256(stored.read_bytes())}" in caught.value.message
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_truncated_blob_is_rejected(
    client: RegistryClient, registry: Registry, tmp_path: Path
) -> None:
    image = tiny_image("amd64", content=os.urandom(64).hex().encode())
    image.push(registry, "tamper/short", "v1")
    registry.blob_data_path(image.layer_digest).write_bytes(image.layer[:-10])
    ref = parse_reference(f"{registry.host}/tamper/short:v1")
    desc = Descriptor(OCI_MANIFEST, image.layer_digest, len(image.layer))
    dest = tmp_path / "layer"
    with pytest.raises(DigestMismatchError, match="size mismatch"):
        client.fetch_blob(ref, desc, dest)
    assert leftovers(tmp_path) == []


def test_tampered_config_fails_resolve(client: RegistryClient, registry: Registry) -> None:
    image = tiny_image("amd64", content=os.urandom(64).hex().encode())
    image.push(registry, "tamper/config", "v1")
    config_path = registry.blob_data_path(sha256(image.config))
    config_path.write_bytes(image.config.replace(b"amd64", b"arm64"))
    with pytest.raises(DigestMismatchError, match="content digest mismatch"):
        client.resolve(parse_reference(f"{registry.host}/tamper/config:v1"))


def test_index_selects_the_requested_platform(client: RegistryClient, registry: Registry) -> None:
    amd64 = tiny_image("amd64", content=b"amd64\n")
    arm64 = tiny_image("arm64", "v8", b"arm64\n")
    attestation = tiny_image("unknown", content=b"in-toto\n")
    for image in (amd64, arm64, attestation):
        image.push(registry, "multi/app")
    # Attestation first: it must be skipped, not taken for a platform-less match.
    index = oci_index([attestation_entry(attestation), arm64.index_entry(), amd64.index_entry()])
    index_digest = registry.put_manifest("multi/app", "v1", index, OCI_INDEX)

    ref = parse_reference(f"{registry.host}/multi/app:v1")
    chosen = client.resolve(ref)
    assert chosen.manifest_digest == amd64.manifest_digest
    assert chosen.platform == "linux/amd64"
    assert client.resolve(ref, "linux/arm64").manifest_digest == arm64.manifest_digest
    assert client.resolve(ref, "linux/aarch64").platform == "linux/arm64/v8"
    assert client.resolve(ref, "linux/x86_64").manifest_digest == amd64.manifest_digest
    pinned = client.resolve(ref.with_digest(index_digest), "linux/arm64/v8")
    assert pinned.manifest_digest == arm64.manifest_digest

    with pytest.raises(RegistryError) as caught:
        client.resolve(ref, "linux/riscv64")
    assert "no image for platform linux/riscv64" in caught.value.message
    assert "available: linux/arm64, linux/amd64" in caught.value.message


def test_unknown_digest_is_manifest_unknown(client: RegistryClient, busybox_ref: str) -> None:
    ref = parse_reference(busybox_ref)
    wrong = parse_reference(f"{ref.repository}@sha256:{'0' * 64}")
    with pytest.raises(RegistryError, match="manifest unknown"):
        client.resolve(wrong)


def test_connection_refused_names_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    with RegistryClient(retries=1, backoff=0.01) as c, pytest.raises(RegistryError) as caught:
        c.resolve(parse_reference(f"127.0.0.1:{port}/x:1"))
    assert caught.value.message == (
        f"127.0.0.1:{port}/x:1: cannot reach registry 127.0.0.1:{port}: connection refused"
    )


# ---------------------------------------------------------------------------------------
# Basic auth against docker-registry with htpasswd.


@pytest.fixture(scope="module")
def auth_busybox(registry_with_auth: Registry, busybox_layout: Path) -> str:
    registry_with_auth.push_layout(busybox_layout, "private/busybox:latest")
    return f"{registry_with_auth.host}/private/busybox:latest"


def test_basic_auth_uses_config_json_credentials(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry_with_auth: Registry,
    auth_busybox: str,
) -> None:
    monkeypatch.setenv(
        "DOCKER_CONFIG", str(write_docker_config(tmp_path / "d", registry_with_auth))
    )
    ref = parse_reference(auth_busybox)
    with RegistryClient() as c:
        image = c.resolve(ref)
        c.fetch_blob(ref, image.layers[0], tmp_path / "layer")
    assert sha256((tmp_path / "layer").read_bytes()) == image.layers[0].digest


def test_missing_credentials_give_the_unauthorized_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auth_busybox: str
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    with RegistryClient() as c, pytest.raises(RegistryError) as caught:
        c.resolve(parse_reference(auth_busybox))
    assert caught.value.message == (
        f"{auth_busybox}: unauthorized: authentication required; "
        f"log in with docker login or check {tmp_path}/config.json"
    )


def test_wrong_password_is_unauthorized(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry_with_auth: Registry,
    auth_busybox: str,
) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "auths": {
                    f"http://{registry_with_auth.host}/v2/": {
                        "username": registry_with_auth.username,
                        "password": "wrong",
                    }
                }
            }
        )
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    with RegistryClient() as c, pytest.raises(RegistryError, match="unauthorized"):
        c.resolve(parse_reference(auth_busybox))


def test_credential_helper_supplies_credentials(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry_with_auth: Registry,
    auth_busybox: str,
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-fake"
    answer = json.dumps(
        {
            "ServerURL": registry_with_auth.host,
            "Username": registry_with_auth.username,
            "Secret": registry_with_auth.password,
        }
    )
    # The helper protocol: the server name on stdin, JSON on stdout.
    helper.write_text(
        "#!/bin/sh\n"
        f'read server; [ "$1" = get ] && [ "$server" = "{registry_with_auth.host}" ] || exit 1\n'
        f"echo '{answer}'\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    (tmp_path / "config.json").write_text(json.dumps({"credsStore": "fake"}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    with RegistryClient() as c:
        assert c.resolve(parse_reference(auth_busybox)).platform == "linux/amd64"


# ---------------------------------------------------------------------------------------
# Credentials lookup and challenge parsing.


def test_docker_hub_credentials_come_from_the_index_key(tmp_path: Path) -> None:
    auth = base64.b64encode(b"hubuser:hubpass").decode()
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth}}})
    )
    found = lookup_credentials("docker.io", tmp_path)
    assert found is not None and (found.username, found.password) == ("hubuser", "hubpass")
    assert lookup_credentials("ghcr.io", tmp_path) is None
    assert "hubpass" not in repr(found)


def test_missing_credential_helper_means_anonymous(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"credsStore": "not-installed-here"}))
    assert lookup_credentials("ghcr.io", tmp_path) is None


def test_www_authenticate_keeps_commas_inside_quotes() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull,push", Basic realm="x \\"y\\""'
    )
    assert parse_www_authenticate(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/busybox:pull,push",
            },
        ),
        Challenge("basic", {"realm": 'x "y"'}),
    ]


# ---------------------------------------------------------------------------------------
# Against a stub registry: bearer tokens, redirects, retries, bad manifests.

Handler = Callable[["StubRegistry", BaseHTTPRequestHandler], tuple[int, dict[str, str], bytes]]


class StubRegistry:
    """A scripted registry on 127.0.0.1 that records every request it gets."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        stub = self

        class RequestHandler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = urlsplit(self.path).path
                stub.requests.append((self.path, dict(self.headers.items())))
                route = stub.routes.get(path)
                status, headers, body = route(stub, self) if route else (404, {}, b"{}")
                # X-Stub-Send-Only: N sends N bytes of the body, then drops the connection.
                send_only = int(headers.pop("X-Stub-Send-Only", len(body)))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:send_only])
                if send_only < len(body):
                    self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[StubRegistry]:
    server = StubRegistry()
    try:
        yield server
    finally:
        server.close()


def test_bearer_token_redirect_and_retry(
    stub: StubRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tiny_image("amd64")
    token = "tok-123"
    failures = {"manifest": 1}
    challenge = (
        f'Bearer realm="http://{stub.host}/token",service="stub",scope="repository:team/app:pull"'
    )

    def authorized(h: BaseHTTPRequestHandler) -> bool:
        return h.headers.get("Authorization") == f"Bearer {token}"

    def token_service(_: StubRegistry, h: BaseHTTPRequestHandler):
        query = parse_qs(urlsplit(h.path).query)
        expected = "Basic " + base64.b64encode(b"alice:pw").decode()
        if h.headers.get("Authorization") != expected or query.get("service") != ["stub"]:
            return 401, {}, b""
        assert query["scope"] == ["repository:team/app:pull"]
        return 200, {}, json.dumps({"access_token": token, "expires_in": 300}).encode()

    def manifest(_: StubRegistry, h: BaseHTTPRequestHandler):
        if not authorized(h):
            return 401, {"WWW-Authenticate": challenge}, b'{"errors":[{"code":"UNAUTHORIZED"}]}'
        if failures["manifest"]:
            failures["manifest"] -= 1
            return 503, {}, b"busy"
        return (
            200,
            {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": image.manifest_digest},
            image.manifest,
        )

    def config(_: StubRegistry, h: BaseHTTPRequestHandler):
        return (
            (200, {}, image.config)
            if authorized(h)
            else (401, {"WWW-Authenticate": challenge}, b"")
        )

    def layer(_: StubRegistry, h: BaseHTTPRequestHandler):
        if not authorized(h):
            return 401, {"WWW-Authenticate": challenge}, b""
        # Blob storage elsewhere: "localhost" is another host as far as URLs go.
        return 307, {"Location": f"http://localhost:{stub.port}/storage/layer?sig=1"}, b""

    def storage(_: StubRegistry, h: BaseHTTPRequestHandler):
        return 200, {}, image.layer

    stub.routes = {
        "/token": token_service,
        "/v2/team/app/manifests/v1": manifest,
        f"/v2/team/app/blobs/{sha256(image.config)}": config,
        f"/v2/team/app/blobs/{image.layer_digest}": layer,
        "/storage/layer": storage,
    }
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {stub.host: {"username": "alice", "password": "pw"}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))

    ref = parse_reference(f"{stub.host}/team/app:v1")
    with RegistryClient(backoff=0.01) as c:
        resolved = c.resolve(ref)
        c.fetch_blob(ref, resolved.layers[0], tmp_path / "layer")
    assert (tmp_path / "layer").read_bytes() == image.layer
    assert resolved.manifest_digest == image.manifest_digest

    paths = [urlsplit(p).path for p, _ in stub.requests]
    assert paths.count("/token") == 1, "the token is cached per repository"
    assert paths.count("/v2/team/app/manifests/v1") == 3, "401, then 503, then 200"
    [(_, storage_headers)] = [r for r in stub.requests if r[0].startswith("/storage/")]
    assert "Authorization" not in storage_headers, "credentials must not follow a redirect"


def test_schema1_manifest_is_refused_clearly(stub: StubRegistry, client: RegistryClient) -> None:
    body = json.dumps({"schemaVersion": 1, "name": "old/app", "tag": "v1", "fsLayers": []})
    stub.routes = {
        "/v2/old/app/manifests/v1": lambda s, h: (
            200,
            {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"},
            body.encode(),
        )
    }
    with pytest.raises(RegistryError) as caught:
        client.resolve(parse_reference(f"{stub.host}/old/app:v1"))
    assert "schema 1" in caught.value.message
    assert caught.value.hint and "re-push" in caught.value.hint


def test_lying_docker_content_digest_is_rejected(
    stub: StubRegistry, client: RegistryClient
) -> None:
    image = tiny_image("amd64")
    stub.routes = {
        "/v2/team/app/manifests/v1": lambda s, h: (
            200,
            {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": "sha256:" + "1" * 64},
            image.manifest,
        )
    }
    with pytest.raises(DigestMismatchError, match="expected sha256:1111"):
        client.resolve(parse_reference(f"{stub.host}/team/app:v1"))


def test_persistent_5xx_gives_up_with_the_status(
    stub: StubRegistry, client: RegistryClient
) -> None:
    stub.routes = {"/v2/team/app/manifests/v1": lambda s, h: (502, {}, b"bad gateway")}
    with pytest.raises(RegistryError, match="answered 502"):
        client.resolve(parse_reference(f"{stub.host}/team/app:v1"))
    assert len(stub.requests) == 4  # the first try and three retries


def test_broken_download_is_restarted(
    stub: StubRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    layer = os.urandom(300_000)
    drops = {"left": 2}

    def blob(_: StubRegistry, h: BaseHTTPRequestHandler):
        if drops["left"]:
            drops["left"] -= 1
            return 200, {"X-Stub-Send-Only": "1000"}, layer
        return 200, {}, layer

    desc = Descriptor("application/octet-stream", sha256(layer), len(layer))
    stub.routes = {f"/v2/team/app/blobs/{desc.digest}": blob}
    client.fetch_blob(parse_reference(f"{stub.host}/team/app:v1"), desc, tmp_path / "blob")
    assert (tmp_path / "blob").read_bytes() == layer
    assert len(stub.requests) == 3
    assert leftovers(tmp_path) == ["blob"]


def test_importing_the_client_does_not_import_requests() -> None:
    code = (
        "import sys, dockbuild.engine.registry.client, dockbuild.engine.sources.oci_layout;"
        "sys.exit('requests' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_more_bytes_than_the_descriptor_says_are_refused(
    stub: StubRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    blob = b"x" * 5000
    desc = Descriptor("application/octet-stream", sha256(blob[:100]), 100)
    stub.routes = {f"/v2/team/app/blobs/{desc.digest}": lambda s, h: (200, {}, blob)}
    with pytest.raises(DigestMismatchError, match="more than the 100 bytes"):
        client.fetch_blob(parse_reference(f"{stub.host}/team/app:v1"), desc, tmp_path / "b")
    assert leftovers(tmp_path) == []
