"""testdata/make_busybox_image.py: a reproducible, valid busybox OCI layout."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

from registry_fixture import make_busybox_layout, require_binary

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root -> its bytes (None for directories)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _blob(layout: Path, digest: str) -> bytes:
    data = (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    return data


def _image(layout: Path) -> tuple[dict, dict, dict, bytes]:
    index = json.loads((layout / "index.json").read_bytes())
    manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]))
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    layer = _blob(layout, manifest["layers"][0]["digest"])
    return index, manifest, config, layer


def test_two_runs_give_identical_bytes(tmp_path: Path, busybox_layout: Path) -> None:
    again = make_busybox_layout(tmp_path / "again")
    assert _tree(again) == _tree(busybox_layout)


def test_rerun_replaces_existing_destination(tmp_path: Path, busybox_layout: Path) -> None:
    dest = tmp_path / "busybox"
    make_busybox_layout(dest)
    (dest / "stale").write_text("left over")
    make_busybox_layout(dest)
    assert _tree(dest) == _tree(busybox_layout)
    assert [p.name for p in tmp_path.iterdir()] == ["busybox"]  # no temp dirs left


def test_layout_uses_oci_media_types_and_tags_latest(busybox_layout: Path) -> None:
    assert json.loads((busybox_layout / "oci-layout").read_bytes()) == {
        "imageLayoutVersion": "1.0.0"
    }
    index, manifest, config, layer = _image(busybox_layout)
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    [entry] = index["manifests"]
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": "latest"}
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["mediaType"] == entry["mediaType"]
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert [lay["mediaType"] for lay in manifest["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ]
    assert manifest["layers"][0]["size"] == len(layer)


def test_config_describes_the_image(busybox_layout: Path) -> None:
    _, _, config, layer = _image(busybox_layout)
    assert config["architecture"] == "amd64"
    assert config["os"] == "linux"
    assert config["config"]["Env"] == [PATH_ENV]
    assert config["config"]["Cmd"] == ["sh"]
    assert len(config["history"]) == 1
    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
    assert config["rootfs"] == {"type": "layers", "diff_ids": [diff_id]}


def test_layer_gzip_header_is_deterministic(busybox_layout: Path) -> None:
    _, _, _, layer = _image(busybox_layout)
    assert layer[:2] == b"\x1f\x8b"
    assert layer[3] & 0x08 == 0  # FNAME flag: no file name stored
    assert layer[4:8] == b"\0\0\0\0"  # mtime 0


def test_layer_has_the_promised_entries(busybox_layout: Path) -> None:
    _, _, _, layer = _image(busybox_layout)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        members = tar.getmembers()
        by_name = {m.name: m for m in members}
        passwd = tar.extractfile("etc/passwd").read().decode()  # type: ignore[union-attr]
        group = tar.extractfile("etc/group").read().decode()  # type: ignore[union-attr]

    names = [m.name for m in members]
    assert names == sorted(names, key=lambda n: n.split("/")), "entries sorted, parents first"
    for m in members:
        assert (m.mtime, m.uname, m.gname) == (0, "", "")
        assert not m.name.startswith("/")

    busybox = by_name["bin/busybox"]
    assert busybox.isreg() and busybox.mode == 0o755
    assert busybox.size == Path("/bin/busybox").stat().st_size

    applets = subprocess.run(
        ["/bin/busybox", "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in {"sh", "ls", "cat", "echo", "id", "wget"} | set(applets) - {"busybox"}:
        link = by_name[f"bin/{applet}"]
        assert link.issym() and link.linkname == "busybox"

    def mode(name: str) -> tuple[int, int, int]:
        m = by_name[name]
        assert m.isdir(), name
        return stat.S_IMODE(m.mode), m.uid, m.gid

    assert mode("tmp") == (0o1777, 0, 0)
    assert mode("root") == (0o700, 0, 0)
    assert mode("home/user") == (0o755, 1000, 1000)
    for empty in ("proc", "sys", "dev"):
        assert mode(empty)[1:] == (0, 0)
        assert not [n for n in names if n.startswith(empty + "/")]

    assert "root:x:0:0:" in passwd
    assert "user:x:1000:1000:user:/home/user:" in passwd
    assert "nobody:x:65534:65534:" in passwd
    assert {"root:x:0:", "user:x:1000:", "nobody:x:65534:"} <= set(group.splitlines())
    assert all(m.uid == m.gid == 0 for m in members if m.name != "home/user")


def test_skopeo_accepts_the_layout(busybox_layout: Path) -> None:
    skopeo = require_binary("skopeo", "skopeo")
    done = subprocess.run(
        [skopeo, "inspect", f"oci:{busybox_layout}:latest"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    inspected = json.loads(done.stdout)
    assert (inspected["Architecture"], inspected["Os"]) == ("amd64", "linux")
    assert inspected["Env"] == [PATH_ENV]


def test_umoci_unpacks_a_runnable_rootfs(tmp_path: Path, busybox_layout: Path) -> None:
    umoci = require_binary("umoci", "umoci")
    bundle = tmp_path / "bundle"
    rootless = os.geteuid() != 0
    done = subprocess.run(
        [
            umoci,
            "unpack",
            *(["--rootless"] if rootless else []),
            "--image",
            f"{busybox_layout}:latest",
            str(bundle),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rootfs = bundle / "rootfs"
    assert (rootfs / "bin" / "busybox").is_file()
    assert (rootfs / "bin" / "sh").is_symlink()
    assert stat.S_IMODE((rootfs / "tmp").stat().st_mode) == 0o1777
    if not rootless:  # rootless unpacking owns everything itself
        assert (rootfs / "home" / "user").stat().st_uid == 1000
    # The unpacked shell runs (busybox-static needs no loader or libraries).
    ran = subprocess.run(
        [str(rootfs / "bin" / "sh"), "-c", "echo hello from busybox"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.stdout == "hello from busybox\n"
