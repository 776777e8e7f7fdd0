"""End-to-end test helpers: run the installed `dockbuild` command as a user would.

(A module of its own, not conftest: several conftest modules share that name on sys.path.)
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKBUILD = str(Path(sys.executable).with_name("dockbuild"))


@dataclass
class Run:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")


class DockbuildCLI:
    """The real command, with its own cache root and the local busybox base image."""

    def __init__(self, root: Path, busybox: Path) -> None:
        self.root = root
        self.busybox = busybox

    @property
    def base_context(self) -> list[str]:
        return ["--build-context", f"busybox=oci-layout://{self.busybox}"]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["DOCKBUILD_ROOT"] = str(self.root)
        env.pop("DOCKBUILD_DEBUG", None)
        env.update(extra or {})
        return env

    def __call__(
        self,
        *args: str,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        input: bytes | None = None,
        check: bool = True,
        timeout: float = 300,
    ) -> Run:
        proc = subprocess.run(
            [DOCKBUILD, *args],
            cwd=cwd,
            env=self.env(env),
            input=input,
            capture_output=True,
            timeout=timeout,
        )
        run = Run(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))
        if check and run.returncode != 0:
            raise AssertionError(f"dockbuild {' '.join(args)} failed ({run.returncode}):\n{run.stderr}")
        return run

    def build(self, context: Path, *args: str, **kw) -> Run:  # type: ignore[no-untyped-def]
        return self("--progress=plain", *self.base_context, *args, str(context), **kw)


def write_context(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def require_docker() -> None:
    """docker load/run tests fail in CI (DOCKBUILD_REQUIRE_DOCKER=1) and skip elsewhere."""
    ok = shutil.which("docker") and subprocess.run(
        ["docker", "info"], capture_output=True, timeout=30
    ).returncode == 0
    if ok:
        return
    if os.environ.get("DOCKBUILD_REQUIRE_DOCKER") == "1":
        pytest.fail("no dockerd answers (DOCKBUILD_REQUIRE_DOCKER=1): start one with .ci/start-dockerd")
    pytest.skip("no dockerd answers; .ci/start-dockerd starts one")


@dataclass
class OciImage:
    """The single image of an OCI layout tar, as a test reads it back."""

    manifest: dict
    config: dict
    layers: list[tarfile.TarFile]  # bottom first, decompressed
    raw: list[bytes]  # every file of the archive, then every layer decompressed

    @property
    def history(self) -> list[dict]:
        return self.config.get("history", [])


def read_oci(archive: bytes | Path) -> OciImage:
    data = archive.read_bytes() if isinstance(archive, Path) else archive
    outer = tarfile.open(fileobj=io.BytesIO(data))  # noqa: SIM115 (in memory)

    def blob(digest: str) -> bytes:
        return outer.extractfile("blobs/sha256/" + digest.split(":")[1]).read()  # type: ignore[union-attr]

    index = json.loads(outer.extractfile("index.json").read())  # type: ignore[union-attr]
    (entry,) = index["manifests"]
    manifest = json.loads(blob(entry["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    raw_layers = [_decompress(blob(d["digest"])) for d in manifest["layers"]]
    layers = [tarfile.open(fileobj=io.BytesIO(r)) for r in raw_layers]  # noqa: SIM115
    files = [outer.extractfile(m).read() for m in outer.getmembers() if m.isfile()]  # type: ignore[union-attr]
    return OciImage(manifest, config, layers, files + raw_layers)


def _decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return data


def layer_names(layers: list[tarfile.TarFile], skip: int = 1) -> list[str]:
    """Entry names of the layers above the first ``skip`` (the base image's)."""
    return [m.name for layer in layers[skip:] for m in layer.getmembers()]


def layer_files(layers: list[tarfile.TarFile], skip: int = 1) -> dict[str, bytes]:
    """Regular files' contents in the layers above the first ``skip``; later layers win."""
    return {
        m.name: layer.extractfile(m).read()  # type: ignore[union-attr]
        for layer in layers[skip:]
        for m in layer.getmembers()
        if m.isfile()
    }
