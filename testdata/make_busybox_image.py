"""Build a reproducible busybox base image (an OCI image layout) from the host's busybox.

Usage: python testdata/make_busybox_image.py [DEST_DIR]   (default: testdata/images/busybox)

The image holds /bin/busybox (Debian's busybox-static), a symlink in /bin for every
applet, a minimal /etc (root, user 1000, nobody 65534) and the usual empty directories.
Two runs on the same host give identical bytes: fixed timestamps (SOURCE_DATE_EPOCH,
default 0), numeric ids with empty user/group names, sorted entries, canonical JSON
and gzip with mtime 0. The layout is built in a temporary directory beside DEST and
renamed into place, so DEST is either the old image or the complete new one.
Standard library only: the test suite and the Makefile run it before anything else.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
DEFAULT_DEST = Path(__file__).resolve().parent / "images" / "busybox"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "user:x:1000:1000:user:/home/user:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\nuser:x:1000:\nnobody:x:65534:\n"

# Directories: path -> (mode, uid, gid). Parents are listed explicitly so that every
# entry's parent precedes it in the tar.
DIRECTORIES: dict[str, tuple[int, int, int]] = {
    "bin": (0o755, 0, 0),
    "dev": (0o755, 0, 0),
    "etc": (0o755, 0, 0),
    "home": (0o755, 0, 0),
    "home/user": (0o755, 1000, 1000),
    "proc": (0o755, 0, 0),
    "root": (0o700, 0, 0),
    "sys": (0o755, 0, 0),
    "tmp": (0o1777, 0, 0),
    "usr": (0o755, 0, 0),
    "usr/bin": (0o755, 0, 0),
    "usr/sbin": (0o755, 0, 0),
    "var": (0o755, 0, 0),
}

# Go's GOARCH names, as OCI configs spell them.
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


def source_date_epoch() -> int:
    """The timestamp for every file and the config (SOURCE_DATE_EPOCH, default 0)."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "0")
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"SOURCE_DATE_EPOCH must be an integer, not {value!r}") from None


def busybox_applets(busybox: Path, emulator: tuple[str, ...] = ()) -> list[str]:
    """The applet names the binary provides (`busybox --list`), without busybox itself;
    a foreign binary runs through `emulator` (`qemu-aarch64-static`)."""
    out = subprocess.run(
        [*emulator, str(busybox), "--list"], check=True, capture_output=True, text=True
    ).stdout
    return sorted({name for name in out.split() if name and name != "busybox" and "/" not in name})


def build_layer_tar(busybox: Path, epoch: int, applets: list[str] | None = None) -> bytes:
    """The uncompressed layer: deterministic headers, entries sorted by path components
    (`applets`: the binary's own list when None)."""
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(
        name: str,
        kind: bytes,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        data: bytes | None = None,
        target: str = "",
    ) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.uname = info.gname = ""
        info.mtime = epoch
        info.linkname = target
        info.size = len(data) if data is not None else 0
        entries.append((info, data))

    for path, (mode, uid, gid) in DIRECTORIES.items():
        add(path, tarfile.DIRTYPE, mode, uid, gid)
    add("bin/busybox", tarfile.REGTYPE, 0o755, data=busybox.read_bytes())
    for applet in busybox_applets(busybox) if applets is None else applets:
        # Relative targets keep the links valid wherever the rootfs is unpacked.
        add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, target="busybox")
    add("etc/passwd", tarfile.REGTYPE, 0o644, data=PASSWD.encode())
    add("etc/group", tarfile.REGTYPE, 0o644, data=GROUP.encode())

    entries.sort(key=lambda entry: entry[0].name.split("/"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def gzip_bytes(data: bytes, level: int = 9) -> bytes:
    """Deterministic gzip: no file name, mtime 0, fixed level (zlib's bytes for it)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=level, mtime=0) as gz:
        gz.write(data)
    return buffer.getvalue()


def canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync one file (the directory is renamed into place later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fchmod(f.fileno(), 0o644)  # not the umask's choice
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def host_arch() -> str:
    """This machine's architecture, as OCI configs spell it."""
    return GOARCH.get(platform.machine(), platform.machine())


def image_blobs(
    busybox: Path, epoch: int, arch: str, variant: str = "", applets: list[str] | None = None
) -> tuple[bytes, bytes, bytes]:
    """The gzipped layer, the config and the manifest of a busybox image for `arch`."""
    created = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    layer_tar = build_layer_tar(busybox, epoch, applets)
    layer = gzip_bytes(layer_tar)
    config = canonical_json(
        {
            "architecture": arch,
            **({"variant": variant} if variant else {}),
            "os": "linux",
            "created": created,
            "config": {"Env": [PATH_ENV], "Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [digest_of(layer_tar)]},
            "history": [
                {
                    "created": created,
                    "created_by": "ADD busybox-static /bin/busybox and its applet links",
                    "comment": "dockbuild testdata/make_busybox_image.py",
                }
            ],
        }
    )
    return layer, config, image_manifest(config, layer)


def image_manifest(config: bytes, layer: bytes) -> bytes:
    """The manifest of a one-layer image (the layer gzipped)."""
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": digest_of(config), "size": len(config)},
            "layers": [
                {"mediaType": MEDIA_LAYER_GZIP, "digest": digest_of(layer), "size": len(layer)}
            ],
        }
    )


def build_layout(root: Path, busybox: Path, epoch: int) -> None:
    """Write oci-layout, index.json and the blobs of the image into the empty dir root."""
    arch = host_arch()
    layer, config, manifest = image_blobs(busybox, epoch, arch)
    write_layout(root, [layer, config, manifest], single_image_index(manifest, arch))


def single_image_index(manifest: bytes, arch: str) -> bytes:
    """index.json of a layout holding one image, tagged latest."""
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                {
                    "mediaType": MEDIA_MANIFEST,
                    "digest": digest_of(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                    "annotations": {"org.opencontainers.image.ref.name": "latest"},
                }
            ],
        }
    )


def write_layout(root: Path, blobs_: list[bytes], index: bytes) -> None:
    """oci-layout, index.json and the blobs, each written once, with fixed permissions."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in blobs_:
        path = blobs / digest_of(blob).removeprefix("sha256:")
        if not path.exists():
            write_file(path, blob)
    write_file(root / "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
    write_file(root / "index.json", index)
    for directory in (blobs, blobs.parent, root):
        # Fixed permissions: mkdtemp's 0700 and the umask must not leak into the result.
        directory.chmod(0o755)
        fsync_dir(directory)


def make_image(dest: Path, busybox: Path = BUSYBOX) -> None:
    """Build the layout beside dest, then swap it in with renames."""
    replace_dir(dest, lambda tmp: build_layout(tmp, busybox, source_date_epoch()))


def replace_dir(dest: Path, build: Callable[[Path], None]) -> None:
    """Run `build` on a new directory beside dest, then swap it in with renames."""
    dest = dest.absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build(tmp)
        if dest.exists():
            # A directory cannot be renamed over a non-empty one: move the old aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "image")
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) > 2:
        print(f"usage: {argv[0]} [DEST_DIR]", file=sys.stderr)
        return 2
    if not BUSYBOX.is_file():
        print(f"{BUSYBOX} not found: install Debian's busybox-static", file=sys.stderr)
        return 1
    make_image(Path(argv[1]) if len(argv) == 2 else DEFAULT_DEST)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
