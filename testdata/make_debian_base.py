"""Build a slim Debian bookworm + python3 base image (an OCI image layout) with debootstrap.

Usage: python testdata/make_debian_base.py [DEST_DIR]   (default: testdata/images/debian)

The base of dockbuild's own image (image/Dockerfile) for `make image` and the tests: the
Dockerfile's RUN steps have no network, so every Debian package the image needs
(python3, uidmap, git, openssh-client, fuse-overlayfs, libcap2-bin for setcap,
ca-certificates) is installed here by `debootstrap --variant=minbase --include=...` from
Debian's package registry (the mirror in /etc/apt/sources.list.d). Runs as root.

Slimmed like Debian's slim images and more: no documentation, man pages, locales, apt
lists or caches, logs, machine-id or __pycache__ (the standard library's bytecode is
compiled again with hashes instead of timestamps, so that python starts fast in the image).
As reproducible as a package registry allows: SOURCE_DATE_EPOCH (default 0) for every
mtime and for shadow's dates, numeric owners, sorted entries, deterministic gzip. Two runs
against the same registry snapshot give the same bytes. The layout is written beside DEST
and renamed into place (make_busybox_image.make_image).
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_busybox_image import (  # noqa: E402  (the sibling script, not a package)
    GOARCH,
    canonical_json,
    digest_of,
    gzip_bytes,
    image_manifest,
    replace_dir,
    single_image_index,
    source_date_epoch,
    write_layout,
)

DEFAULT_DEST = Path(__file__).resolve().parent / "images" / "debian"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = [
    "python3",
    "uidmap",
    "git",
    "openssh-client",
    "fuse-overlayfs",
    "libcap2-bin",
    "ca-certificates",
]
CHROOT = "/usr/sbin/chroot"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Removed after debootstrap: paths relative to the rootfs; a trailing "/*" empties a
# directory and keeps it.
SLIM = [
    "usr/share/doc/*",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
    "usr/share/lintian/*",
    "usr/share/linda/*",
    "usr/share/bug/*",
    "usr/share/common-licenses/*",
    "usr/share/perl/5.36/pod/*",
    "usr/share/zoneinfo",
    "usr/lib/x86_64-linux-gnu/gconv/[!g]*",  # iconv's charsets (the gconv-modules index stays)
    "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.d",
    "usr/lib/python3.*/pydoc_data",
    "var/lib/apt/lists/*",
    "var/cache/apt/*",
    "var/cache/debconf/*-old",
    "var/cache/ldconfig/aux-cache",
    "var/lib/dpkg/*-old",
    "var/log/*",
    "dev/*",
    "run/*",
    "tmp/*",
    "var/tmp/*",
    "etc/machine-id",
    "var/lib/dbus/machine-id",
    "etc/hostname",
    "etc/resolv.conf",
    "etc/ssh/ssh_host_*",
    "etc/passwd-",
    "etc/group-",
    "etc/shadow-",
    "etc/gshadow-",
    "debootstrap",
]

# Keep dpkg from installing what SLIM removes when a Dockerfile installs more packages
# (as Debian's slim images do).
DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
"""


def run_debootstrap(rootfs: Path, epoch: int) -> None:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "SOURCE_DATE_EPOCH": str(epoch),
        "LC_ALL": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    cmd = [
        "debootstrap",
        "--variant=minbase",
        "--merged-usr",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(rootfs),
        MIRROR,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        log = rootfs / "debootstrap" / "debootstrap.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else result.stdout[-3000:]
        raise SystemExit(f"debootstrap failed ({result.returncode}):\n{tail}\n{result.stderr}")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# Purged although git depends on them: full perl (perl-base stays) is 47 MB, and only git's
# perl scripts need it (send-email, svn, cvs, instaweb, archimport); git's C commands,
# which dockbuild's git sources use, do not. The server-side git programs go too.
PURGE = ["perl", "perl-modules-5.36", "libperl5.36", "liberror-perl", "git-man"]
GIT_SERVER_PROGRAMS = [
    "git-daemon",
    "git-http-backend",
    "git-http-push",
    "git-imap-send",
    "git-shell",
    "scalar",
]


def slim(rootfs: Path, epoch: int) -> None:
    subprocess.run(
        [CHROOT, str(rootfs), "dpkg", "--purge", "--force-depends", *PURGE],
        check=True,
        capture_output=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"},
    )
    for program in GIT_SERVER_PROGRAMS:
        remove(rootfs / "usr/lib/git-core" / program)
        remove(rootfs / "usr/bin" / program)
    for pattern in SLIM:
        for path in rootfs.glob(pattern):
            remove(path)
    for cache in sorted(rootfs.rglob("__pycache__"), reverse=True):
        remove(cache)
    (rootfs / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(DPKG_EXCLUDES)
    # shadow's "last change" day of every account: the epoch's day, not today's.
    day = str(epoch // 86400)
    shadow = rootfs / "etc/shadow"
    lines = []
    for line in shadow.read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[2]:
            fields[2] = day
        lines.append(":".join(fields))
    shadow.write_text("\n".join(lines) + "\n")
    # The standard library's bytecode, keyed by source hashes (no timestamps in it).
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = next((rootfs / "usr/lib").glob("python3.*[0-9]"), None)
    if stdlib is not None:
        version = stdlib.name
        subprocess.run(
            [
                CHROOT, str(rootfs), f"/usr/bin/{version}", "-m", "compileall", "-q", "-f",
                "--invalidation-mode", "unchecked-hash", "-x", "/(test|idlelib|lib2to3|tkinter)/",
                f"/usr/lib/{version}",
            ],
            check=True,
            env={"PATH": "/usr/bin:/bin", "SOURCE_DATE_EPOCH": str(epoch)},
        )


def layer_tar(rootfs: Path, epoch: int) -> bytes:
    """The rootfs as a tar: sorted, numeric owners, mtimes clamped, xattrs as PAX records."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths: list[Path] = []
        for top, dirs, files in os.walk(rootfs):
            dirs.sort()
            for name in sorted(dirs + files):
                paths.append(Path(top) / name)
        paths.sort(key=lambda p: p.relative_to(rootfs).parts)
        for path in paths:
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(rootfs)))
            if info.isdev() or stat.S_ISSOCK(path.lstat().st_mode):
                continue
            info.mtime = min(int(info.mtime), epoch)
            info.uname = info.gname = ""
            xattrs = {}
            for key in sorted(os.listxattr(path, follow_symlinks=False)):
                if key.startswith(("security.", "user.")) and key != "security.selinux":
                    value = os.getxattr(path, key, follow_symlinks=False)
                    xattrs["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
            info.pax_headers = xattrs
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buffer.getvalue()


def build_layout(root: Path, epoch: int) -> None:
    """debootstrap into a scratch rootfs beside root, slim it, write the layout into root."""
    arch = GOARCH.get(platform.machine(), platform.machine())
    created = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    scratch = Path(tempfile.mkdtemp(prefix=".debian-rootfs-", dir=root.parent))
    try:
        rootfs = scratch / "rootfs"
        run_debootstrap(rootfs, epoch)
        slim(rootfs, epoch)
        layer_raw = layer_tar(rootfs, epoch)
    finally:
        shutil.rmtree(scratch)
    layer = gzip_bytes(layer_raw, level=6)
    config = canonical_json(
        {
            "architecture": arch,
            "os": "linux",
            "created": created,
            "config": {"Env": [PATH_ENV, "LANG=C.UTF-8"], "Cmd": ["python3"]},
            "rootfs": {"type": "layers", "diff_ids": [digest_of(layer_raw)]},
            "history": [
                {
                    "created": created,
                    "created_by": f"debootstrap --variant=minbase --include={','.join(PACKAGES)}"
                    f" {SUITE}, slimmed",
                    "comment": "dockbuild testdata/make_debian_base.py",
                }
            ],
        }
    )
    manifest = image_manifest(config, layer)
    write_layout(root, [layer, config, manifest], single_image_index(manifest, arch))


def main(argv: list[str]) -> int:
    if len(argv) > 2:
        print(f"usage: {argv[0]} [DEST_DIR]", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("debootstrap needs root", file=sys.stderr)
        return 1
    if shutil.which("debootstrap") is None:
        print("debootstrap not found: install Debian's debootstrap", file=sys.stderr)
        return 1
    dest = Path(argv[1]) if len(argv) == 2 else DEFAULT_DEST
    replace_dir(dest, lambda tmp: build_layout(tmp, source_date_epoch()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
