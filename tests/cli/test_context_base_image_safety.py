"""A base image whose layer tries to write outside its snapshot (crafted tars: `..`,
symlink and hardlink escapes) fails the build clearly, through the image source path of
the real CLI, writes nothing outside, and leaves no layer behind in the cache."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from clitools import DockbuildCLI, write_context


def _blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return "sha256:" + digest


def _layout(root: Path, layer: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "crafted"}],
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _blob(root, config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": _blob(root, layer), "size": len(layer)}],
    }).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": _blob(root, manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }]}
    (root / "index.json").write_text(json.dumps(index))
    return root


def _tar(members: list[tuple[str, bytes, str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, link, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


CASES = {
    "dotdot": lambda out: [("../../../../../../" + str(out).lstrip("/") + "/dotdot", tarfile.REGTYPE, "", b"x")],
    "symlink": lambda out: [("evil", tarfile.SYMTYPE, str(out), b""), ("evil/through-link", tarfile.REGTYPE, "", b"x")],
    "hardlink": lambda out: [("h", tarfile.LNKTYPE, "/etc/hostname", b"")],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_escaping_base_layer_fails_cleanly(dockbuild: DockbuildCLI, tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    layout = _layout(tmp_path / "evil-image", _tar(CASES[case](outside)))
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM evil\nRUN true\n"})
    run = dockbuild("--progress=plain", "--build-context", f"evil=oci-layout://{layout}",
                    "-o", f"type=local,dest={tmp_path / 'out'}", str(ctx), check=False)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    error = run.stderr[run.stderr.index("ERROR"):]
    assert "sha256:" in error or "layer" in error, error  # the layer is named, not the RUN
    assert list(outside.iterdir()) == []
    snapshots = dockbuild.root / "snapshots"
    assert not snapshots.exists() or list(snapshots.iterdir()) == []
    # the cache is still good for the next build
    good = write_context(tmp_path / "good", {"Dockerfile": "FROM busybox\nRUN echo ok > /ok\n"})
    dockbuild.build(good, "-o", f"type=local,dest={tmp_path / 'good-out'}")
    assert (tmp_path / "good-out/ok").read_text() == "ok\n"
