"""Pytest plugin: a real registry (Debian's docker-registry) and the busybox test image.

Loaded from tests/conftest.py with `pytest_plugins = ["registry_fixture"]`. Missing
binaries make the tests that need them fail with a message naming the Debian package,
never skip: CI installs them, and a silent skip would hide a broken setup.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
MAKE_BUSYBOX = REPO / "testdata" / "make_busybox_image.py"
MAKE_MULTI = REPO / "testdata" / "make_multiplatform_image.py"
MULTI_LAYOUT = REPO / "testdata" / "images" / "busybox-multi"
REGISTRY_STARTUP_TIMEOUT = 15.0
# The registry checks the bcrypt hash on every request: the cheapest cost keeps it fast.
BCRYPT_COST = 4


def require_binary(name: str, package: str) -> str:
    """The path of a binary the tests need, or a loud failure naming its package."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package {package}); the tests need it")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bcrypt_htpasswd_line(username: str, password: str) -> str:
    """An htpasswd entry in bcrypt, the only format docker-registry accepts.

    `htpasswd -B` when apache2-utils is installed; else glibc's crypt(3), which
    speaks bcrypt on Debian (libxcrypt), through the `crypt` module of Python <= 3.12.
    """
    htpasswd = shutil.which("htpasswd")
    if htpasswd:
        out = subprocess.run(
            [htpasswd, "-nbB", "-C", str(BCRYPT_COST), username, password],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.strip()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # removed in Python 3.13
    except ImportError:
        pytest.skip(
            "registry_with_auth: no way to make a bcrypt htpasswd entry "
            "(install apache2-utils for htpasswd)"
        )
    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << BCRYPT_COST))
    if not hashed or not hashed.startswith("$2"):
        pytest.skip(
            "registry_with_auth: this libcrypt has no bcrypt (install apache2-utils for htpasswd)"
        )
    return f"{username}:{hashed}"


@dataclass
class Registry:
    """A running docker-registry on 127.0.0.1 (plain HTTP), with helpers to fill it."""

    host: str
    storage: Path
    process: subprocess.Popen[bytes]
    log: Path
    username: str | None = None
    password: str | None = None
    session: requests.Session = field(default_factory=requests.Session)
    # Behind TLS: the test CA and a certs.d-style directory (<dir>/<host>/ca.crt).
    ca: Path | None = None
    certs_d: Path | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://{self.host}"

    def _auth(self) -> tuple[str, str] | None:
        return (self.username, self.password) if self.username and self.password else None

    def push_layout(self, layout: Path, name_tag: str, all_platforms: bool = False) -> str:
        """Copy the `latest` image of an OCI layout to HOST/name:tag; return its digest
        (with all_platforms, an index and every platform's image, else the host's)."""
        skopeo = require_binary("skopeo", "skopeo")
        with tempfile.TemporaryDirectory() as tmp:
            digest_file = Path(tmp) / "digest"
            command = [
                skopeo,
                "copy",
                "--quiet",
                "--insecure-policy",
                "--preserve-digests",
                "--dest-tls-verify=false",
                "--digestfile",
                str(digest_file),
            ]
            if self._auth():
                command += ["--dest-creds", f"{self.username}:{self.password}"]
            if all_platforms:
                command.append("--all")
            command += [f"oci:{layout}:latest", f"docker://{self.host}/{name_tag}"]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                pytest.fail(f"skopeo copy failed ({done.returncode}): {done.stderr.strip()}")
            return digest_file.read_text().strip()

    def put_blob(self, repository: str, data: bytes) -> str:
        """Upload a blob monolithically (POST then PUT ?digest=); return its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        started = self.session.post(
            f"{self.url}/v2/{repository}/blobs/uploads/", auth=self._auth(), timeout=30
        )
        started.raise_for_status()
        location = started.headers["Location"]
        if location.startswith("/"):
            location = self.url + location
        done = self.session.put(
            location,
            params={"digest": digest},
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            auth=self._auth(),
            timeout=30,
        )
        done.raise_for_status()
        return digest

    def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        """PUT a manifest or index under a tag or digest; return its digest."""
        response = self.session.put(
            f"{self.url}/v2/{repository}/manifests/{reference}",
            data=body,
            headers={"Content-Type": media_type},
            auth=self._auth(),
            timeout=30,
        )
        if response.status_code >= 400:
            pytest.fail(f"registry refused the manifest: {response.status_code} {response.text}")
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def blob_data_path(self, digest: str) -> Path:
        """Where the filesystem driver stores a blob's bytes (for corruption tests)."""
        algorithm, _, hex_part = digest.partition(":")
        return (
            self.storage
            / "docker"
            / "registry"
            / "v2"
            / "blobs"
            / algorithm
            / hex_part[:2]
            / hex_part
            / "data"
        )

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def _start_registry(
    root: Path, htpasswd_line: str | None = None, tls: tuple[Path, Path, Path] | None = None
) -> Registry:
    """Start docker-registry with a generated config; wait until /v2/ answers."""
    binary = require_binary("docker-registry", "docker-registry")
    root.mkdir(parents=True, exist_ok=True)
    storage = root / "storage"
    port = _free_port()
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "dockbuild-tests"},
    }
    if htpasswd_line is not None:
        htpasswd = root / "htpasswd"
        htpasswd.write_text(htpasswd_line + "\n")
        config["auth"] = {"htpasswd": {"realm": "dockbuild-tests", "path": str(htpasswd)}}
    if tls is not None:  # (ca, certificate, key)
        config["http"]["tls"] = {"certificate": str(tls[1]), "key": str(tls[2])}  # type: ignore[index]
    config_path = root / "config.yml"
    # JSON is YAML: no YAML library needed.
    config_path.write_text(json.dumps(config, indent=2))
    log = root / "registry.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [binary, "serve", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    registry = Registry(host=f"127.0.0.1:{port}", storage=storage, process=process, log=log)
    if tls is not None:
        registry.ca = tls[0]
        registry.session.verify = str(tls[0])
        registry.certs_d = root / "certs.d"
        (registry.certs_d / registry.host).mkdir(parents=True)
        shutil.copyfile(tls[0], registry.certs_d / registry.host / "ca.crt")
    deadline = time.monotonic() + REGISTRY_STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            pytest.fail(f"docker-registry exited with {process.returncode}:\n{registry.log_text()}")
        try:
            verify = str(tls[0]) if tls is not None else True
            if requests.get(f"{registry.url}/v2/", timeout=1, verify=verify).status_code in (
                200,
                401,
            ):
                return registry
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            _stop_registry(registry)
            pytest.fail(
                f"docker-registry did not answer within {REGISTRY_STARTUP_TIMEOUT} s:\n"
                f"{registry.log_text()}"
            )
        time.sleep(0.05)


def _stop_registry(registry: Registry) -> None:
    registry.session.close()
    if registry.process.poll() is None:
        registry.process.send_signal(signal.SIGTERM)
        try:
            registry.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            registry.process.kill()
            registry.process.wait()


def make_busybox_layout(dest: Path) -> Path:
    """Run testdata/make_busybox_image.py into dest; fail with its stderr if it fails."""
    done = subprocess.run(
        [sys.executable, str(MAKE_BUSYBOX), str(dest)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0 or done.stdout:
        pytest.fail(
            f"make_busybox_image.py failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return dest


@pytest.fixture(scope="session")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox OCI layout, built once per session (tag `latest`)."""
    return make_busybox_layout(tmp_path_factory.mktemp("busybox-image") / "busybox")


@pytest.fixture(scope="session")
def busybox_multi_layout() -> Path:
    """busybox for linux/amd64, arm64, arm/v7 and riscv64 in one index (tag `latest`):
    testdata/images/busybox-multi, made by `make setup` (here when it is missing)."""
    if not (MULTI_LAYOUT / "index.json").exists():
        done = subprocess.run(
            [sys.executable, str(MAKE_MULTI), str(MULTI_LAYOUT)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.fail(f"make_multiplatform_image.py failed ({done.returncode}):\n{done.stderr}")
    return MULTI_LAYOUT


@pytest.fixture(scope="session")
def busybox_multi_ref(registry: Registry, busybox_multi_layout: Path) -> str:
    """`HOST/library/busybox-multi:latest` in the session registry: the four-platform index."""
    registry.push_layout(busybox_multi_layout, "library/busybox-multi:latest", all_platforms=True)
    return f"{registry.host}/library/busybox-multi:latest"


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry without auth, for the whole session."""
    running = _start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield running
    finally:
        _stop_registry(running)


@pytest.fixture(scope="session")
def registry_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry demanding basic auth (htpasswd, bcrypt) as `tester`."""
    username, password = "tester", "s3cret-pw"
    running = _start_registry(
        tmp_path_factory.mktemp("registry-auth"), _bcrypt_htpasswd_line(username, password)
    )
    running.username, running.password = username, password
    try:
        yield running
    finally:
        _stop_registry(running)


def write_docker_config(directory: Path, registry: Registry) -> Path:
    """A config.json with the registry's credentials (base64 `auth`); returns the dir."""
    directory.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(f"{registry.username}:{registry.password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
    os.chmod(directory / "config.json", 0o600)
    return directory


@pytest.fixture(scope="session")
def busybox_ref(registry: Registry, busybox_layout: Path) -> str:
    """`HOST/library/busybox:latest` in the session registry."""
    registry.push_layout(busybox_layout, "library/busybox:latest")
    return f"{registry.host}/library/busybox:latest"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TinyImage:
    """A one-file image made in memory, for indexes and corruption tests."""

    config: bytes
    layer: bytes
    manifest: bytes
    platform: dict[str, str]

    @property
    def manifest_digest(self) -> str:
        return _sha256(self.manifest)

    @property
    def layer_digest(self) -> str:
        return _sha256(self.layer)

    def index_entry(self) -> dict[str, object]:
        return {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": self.manifest_digest,
            "size": len(self.manifest),
            "platform": self.platform,
        }

    def push(self, registry: Registry, repository: str, tag: str | None = None) -> str:
        """Upload blobs and the manifest (by tag, else by digest); return its digest."""
        registry.put_blob(repository, self.config)
        registry.put_blob(repository, self.layer)
        return registry.put_manifest(
            repository,
            tag or self.manifest_digest,
            self.manifest,
            "application/vnd.oci.image.manifest.v1+json",
        )

    def write_blobs(self, layout: Path) -> None:
        """Store the blobs in an OCI layout's blobs/sha256 (index.json is the caller's)."""
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        for blob in (self.config, self.layer, self.manifest):
            (blobs / _sha256(blob).removeprefix("sha256:")).write_bytes(blob)


def tiny_image(architecture: str, variant: str = "", content: bytes = b"hello\n") -> TinyImage:
    """An image whose one layer holds /hello with `content`, for one platform."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("hello")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    platform = {"architecture": architecture, "os": "linux"}
    if variant:
        platform["variant"] = variant
    config = json.dumps(
        {
            **platform,
            "config": {"Cmd": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": [_sha256(raw.getvalue())]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _sha256(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _sha256(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    return TinyImage(config=config, layer=layer, manifest=manifest, platform=platform)


def oci_index(entries: list[dict[str, object]]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }
    ).encode()


def attestation_entry(image: TinyImage) -> dict[str, object]:
    """An index entry shaped like BuildKit's attestation manifests (unknown/unknown)."""
    return {
        **image.index_entry(),
        "platform": {"architecture": "unknown", "os": "unknown"},
        "annotations": {
            "vnd.docker.reference.type": "attestation-manifest",
            "vnd.docker.reference.digest": image.manifest_digest,
        },
    }


def make_test_ca(directory: Path, host_ip: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``host_ip`` signed by it (openssl)."""
    openssl = require_binary("openssl", "openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "ext.cnf"
    ext.write_text(
        f"subjectAltName=IP:{host_ip},DNS:localhost\n"
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=dockbuild test CA", "-keyout", ca_key, "-out", ca],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host_ip}",
         "-keyout", key, "-out", csr],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-days", "2", "-extfile", ext, "-out", cert],
    ]  # fmt: skip
    for command in steps:
        done = subprocess.run(
            [str(c) for c in command], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            pytest.fail(f"openssl failed: {done.stderr.strip()}")
    return ca, cert, key


@pytest.fixture(scope="session")
def registry_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry behind TLS with a certificate from a generated test CA.

    ``.certs_d`` is a docker-style certs.d directory holding the CA for its host; point
    ``DOCKBUILD_CERTS_D`` (dockbuild) or ``--cert-dir`` (skopeo) at it.
    """
    root = tmp_path_factory.mktemp("registry-tls")
    running = _start_registry(root, tls=make_test_ca(root / "pki"))
    try:
        yield running
    finally:
        _stop_registry(running)
