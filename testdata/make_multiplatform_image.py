"""Build a reproducible multi-platform busybox image: an OCI layout whose index has
linux/amd64, linux/arm64, linux/arm/v7 and linux/riscv64.

Usage: python testdata/make_multiplatform_image.py [DEST_DIR]
(default: testdata/images/busybox-multi)

The amd64 image is the one make_busybox_image.py makes from the host's busybox-static;
the others hold the busybox-static packages of those architectures, fetched from the
Debian mirror apt is configured with (apt-get download with a private package list, so
the host's apt state is untouched; apt checks the archive's signatures). The suite is
trixie: it is the first with riscv64. The .deb files are kept in DEST_DIR/../.debs, so
a second run is offline and gives the same bytes. Applet lists come from running each
busybox through its qemu-*-static (qemu-user-static), which needs no binfmt_misc.

index.json has one entry, tag `latest`, pointing at the image index (as BuildKit's OCI
output does), so `skopeo copy --all oci:DIR:latest` pushes every platform at once.
Standard library only.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_busybox_image as busybox_image  # noqa: E402 (this folder is no package)

DEFAULT_DEST = Path(__file__).resolve().parent / "images" / "busybox-multi"
SUITE = "trixie"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Debian architecture -> (OCI architecture, variant, QEMU's name for it).
FOREIGN = {
    "arm64": ("arm64", "v8", "aarch64"),
    "armhf": ("arm", "v7", "arm"),
    "riscv64": ("riscv64", "", "riscv64"),
}


def debian_mirror() -> str:
    """The first Debian archive URI in apt's sources (deb822 .sources or sources.list)."""
    candidates: list[str] = []
    sources_dir = Path("/etc/apt/sources.list.d")
    files = sorted(sources_dir.glob("*.sources")) + [Path("/etc/apt/sources.list")]
    files += sorted(sources_dir.glob("*.list"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        candidates += re.findall(r"^URIs:\s*(\S+)", text, re.MULTILINE)
        candidates += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.MULTILINE)
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    raise SystemExit("no Debian archive (a URI ending in /debian) in apt's sources")


def download_debs(debs: Path) -> dict[str, Path]:
    """busybox-static of each foreign architecture, downloaded into debs unless there."""
    found = {arch: sorted(debs.glob(f"busybox-static_*_{arch}.deb")) for arch in FOREIGN}
    if all(found.values()):
        return {arch: paths[-1] for arch, paths in found.items()}
    if shutil.which("apt-get") is None:
        raise SystemExit("apt-get not found: the foreign busybox images need Debian's apt")
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dockbuild-apt-") as tmp:
        state = Path(tmp)
        for sub in ("lists/partial", "cache/archives/partial"):
            (state / sub).mkdir(parents=True)
        (state / "sources.list").write_text(
            f"deb [signed-by={KEYRING}] {debian_mirror()} {SUITE} main\n"
        )
        options = [
            f"-oDir::Etc::SourceList={state / 'sources.list'}",
            f"-oDir::Etc::SourceParts={state / 'none'}",
            f"-oDir::State::Lists={state / 'lists'}",
            f"-oDir::Cache={state / 'cache'}",
            "-oDir::State::status=/dev/null",
            "-oAcquire::Languages=none",
            "-oAPT::Sandbox::User=root",
            f"-oAPT::Architecture={next(iter(FOREIGN))}",
            *(f"-oAPT::Architectures::={arch}" for arch in FOREIGN),
        ]
        for args in (["update"], ["download", *(f"busybox-static:{a}" for a in FOREIGN)]):
            done = subprocess.run(
                ["apt-get", "-qq", *options, *args], cwd=debs, capture_output=True, text=True
            )
            if done.returncode != 0:
                raise SystemExit(f"apt-get {args[0]} failed:\n{done.stderr}")
    return download_debs(debs)


def extract_busybox(deb: Path, dest: Path) -> Path:
    """/usr/bin/busybox (or /bin/busybox) of a .deb (an ar archive holding data.tar.*)."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise SystemExit(f"{deb} is not a Debian package")
    offset = 8
    while offset < len(data):
        header = data[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        member = data[offset + 60 : offset + 60 + size]
        offset += 60 + size + (size % 2)
        if not name.startswith("data.tar"):
            continue
        with tarfile.open(fileobj=io.BytesIO(member)) as tar:  # xz, zstd-less Debian
            for path in ("./usr/bin/busybox", "./bin/busybox"):
                try:
                    extracted = tar.extractfile(path)
                except KeyError:
                    continue
                if extracted is not None:
                    dest.write_bytes(extracted.read())
                    dest.chmod(0o755)
                    return dest
    raise SystemExit(f"{deb} holds no busybox binary")


def build_multi_layout(root: Path, debs: dict[str, Path], epoch: int) -> None:
    """The layout: every platform's blobs, the image index, index.json tagging it latest."""
    blobs: list[bytes] = []
    manifests: list[dict[str, object]] = []

    def add(binary: Path, arch: str, variant: str, applets: list[str] | None) -> None:
        layer, config, manifest = busybox_image.image_blobs(binary, epoch, arch, variant, applets)
        blobs.extend((layer, config, manifest))
        platform = {"architecture": arch, "os": "linux", **({"variant": variant} if variant else {})}
        manifests.append(
            {
                "mediaType": busybox_image.MEDIA_MANIFEST,
                "digest": busybox_image.digest_of(manifest),
                "size": len(manifest),
                "platform": platform,
            }
        )

    add(busybox_image.BUSYBOX, busybox_image.host_arch(), "", None)
    with tempfile.TemporaryDirectory(prefix="dockbuild-busybox-") as tmp:
        for debian_arch, (arch, variant, qemu) in FOREIGN.items():
            binary = extract_busybox(debs[debian_arch], Path(tmp) / f"busybox-{debian_arch}")
            emulator = shutil.which(f"qemu-{qemu}-static")
            if emulator is None:
                raise SystemExit(f"qemu-{qemu}-static not found: install qemu-user-static")
            add(binary, arch, variant, busybox_image.busybox_applets(binary, (emulator,)))
    index = busybox_image.canonical_json(
        {"schemaVersion": 2, "mediaType": busybox_image.MEDIA_INDEX, "manifests": manifests}
    )
    top = busybox_image.canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": busybox_image.MEDIA_INDEX,
            "manifests": [
                {
                    "mediaType": busybox_image.MEDIA_INDEX,
                    "digest": busybox_image.digest_of(index),
                    "size": len(index),
                    "annotations": {"org.opencontainers.image.ref.name": "latest"},
                }
            ],
        }
    )
    busybox_image.write_layout(root, [*blobs, index], top)


def main(argv: list[str]) -> int:
    if len(argv) > 2:
        print(f"usage: {argv[0]} [DEST_DIR]", file=sys.stderr)
        return 2
    dest = Path(argv[1]) if len(argv) == 2 else DEFAULT_DEST
    if not busybox_image.BUSYBOX.is_file():
        print(f"{busybox_image.BUSYBOX} not found: install Debian's busybox-static", file=sys.stderr)
        return 1
    debs = download_debs(dest.absolute().parent / ".debs")
    epoch = busybox_image.source_date_epoch()
    busybox_image.replace_dir(dest, lambda tmp: build_multi_layout(tmp, debs, epoch))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
