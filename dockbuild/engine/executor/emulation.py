"""Which platforms' binaries this machine runs: natively, or through a binfmt_misc emulator.

A RUN step of a foreign platform (``--platform linux/arm64`` on an amd64 host) executes the
image's own binaries; the kernel runs them through the interpreter binfmt_misc has for their
ELF header (QEMU user mode). The solver calls :func:`require_runnable` when a step of a
foreign platform misses the cache, before that step starts (a cached one needs no emulator,
as in BuildKit), so that a missing emulator is one clear error rather than ``exec format
error`` in the step.

How a platform is judged (``support``):

1. The binfmt_misc entries (``/proc/sys/fs/binfmt_misc``) are matched, by their magic and
   mask, against the ELF header of the platform's executables. An enabled match is the
   emulator, with its interpreter and flags. This is read, not run: it names the
   interpreter, tells a disabled entry from a missing one, and sees the F flag.
2. Without a match, a tiny static program of that platform (an ``exit(0)``, about a
   hundred bytes, as BuildKit's ``archutil`` runs one per architecture) is executed: if it runs, the
   kernel runs that platform itself (linux/386 on amd64, linux/arm/v7 on most arm64). The
   same probe answers where binfmt_misc is not mounted in this mount namespace (a
   container): the host's entries still apply there, they just cannot be read.

An entry without the F flag is refused: the kernel then opens its interpreter by path at
each exec, inside the step's rootfs, where base images have no QEMU; with F it opened the
interpreter once, at registration, and that open file serves every mount namespace, chroot
and user namespace after it, so every executor and rootless builds run foreign steps alike.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from dockbuild import platforms
from dockbuild.errors import ExecutorError

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")

# ELF class (1: 32-bit, 2: 64-bit), data (1: little-, 2: big-endian), e_machine, e_flags,
# QEMU's name for the architecture, and the code of an exit(0), per architecture. The
# variants of arm share one entry: QEMU's arm emulator runs them all.
_ARM_EABI5_HARD_FLOAT = 0x05000400
_ELF: dict[str, tuple[int, int, int, int, str, bytes]] = {
    "amd64": (2, 1, 62, 0, "x86_64", bytes.fromhex("b83c000000" "31ff" "0f05")),
    "386": (1, 1, 3, 0, "i386", bytes.fromhex("b801000000" "31db" "cd80")),
    "arm64": (2, 1, 183, 0, "aarch64", bytes.fromhex("000080d2" "a80b80d2" "010000d4")),
    "arm": (1, 1, 40, _ARM_EABI5_HARD_FLOAT, "arm", bytes.fromhex("0000a0e3" "0170a0e3" "000000ef")),
    "riscv64": (2, 1, 243, 0, "riscv64", bytes.fromhex("13050000" "9308d005" "73000000")),
    "ppc64le": (2, 1, 21, 2, "ppc64le", bytes.fromhex("01000038" "00006038" "02000044")),
    "s390x": (2, 2, 22, 0, "s390x", bytes.fromhex("a7290000" "0a01")),
}
# The platforms `dockbuild debug info` reports on.
KNOWN = ("linux/amd64", "linux/386", "linux/arm64", "linux/arm/v7", "linux/riscv64",
         "linux/ppc64le", "linux/s390x")  # fmt: skip
_LOAD_ADDRESS = 0x10000  # above the usual vm.mmap_min_addr


@dataclass(frozen=True)
class BinfmtEntry:
    """One binfmt_misc registration (``/proc/sys/fs/binfmt_misc/NAME``) of the magic type."""

    name: str
    enabled: bool
    interpreter: str
    flags: str
    offset: int
    magic: bytes
    mask: bytes

    @property
    def fix_binary(self) -> bool:
        """The F flag: the interpreter was opened at registration (works in any rootfs)."""
        return "F" in self.flags

    def matches(self, header: bytes) -> bool:
        window = header[self.offset : self.offset + len(self.magic)]
        if len(window) < len(self.magic):
            return False
        mask = self.mask or b"\xff" * len(self.magic)
        return all(h & m == g & m for h, m, g in zip(window, mask, self.magic, strict=True))


@dataclass(frozen=True)
class Support:
    """How this machine runs one platform's binaries."""

    platform: str
    how: str  # "native" | "emulated" | "runs" (works, binfmt_misc unreadable) | "missing" | "refused"
    entry: BinfmtEntry | None = None
    reason: str = ""  # for "missing" and "refused"

    @property
    def runs(self) -> bool:
        return self.how in ("native", "emulated", "runs")

    def info(self) -> dict[str, object]:
        out: dict[str, object] = {"platform": self.platform, "how": self.how}
        if self.entry is not None:
            out.update(
                binfmt=self.entry.name, interpreter=self.entry.interpreter, flags=self.entry.flags
            )
        if self.reason:
            out["reason"] = self.reason
        return out


def require_runnable(platform: str) -> None:
    """Raise a clear error when RUN steps of ``platform`` (a normalised name, as
    ``dockbuild.platforms``) cannot run here: what is missing, and how to get it."""
    support = support_of(platform)
    if not support.runs:
        raise ExecutorError(
            f"RUN steps for {platform} cannot run on this {platforms.host()} machine: "
            f"{support.reason}",
            hint=_hint(platform, support),
        )


def machine_info() -> dict[str, object]:
    """For `dockbuild debug info`: the platforms run natively, through which emulator, or not."""
    supports = [support_of(p) for p in KNOWN]
    return {
        "binfmt_misc": str(BINFMT_DIR) if _binfmt_readable() else "not mounted here",
        "native": [s.platform for s in supports if s.how == "native"],
        "emulated": [s.info() for s in supports if s.how in ("emulated", "runs")],
        "unavailable": [s.info() for s in supports if not s.runs],
    }


@functools.cache
def support_of(platform: str) -> Support:
    """How this machine runs ``platform``'s binaries (probed once per process)."""
    os_name, arch, _ = platforms.split(platform)
    if platform == platforms.host():
        return Support(platform, "native")
    if os_name != "linux":
        return Support(platform, "missing", reason="this machine runs Linux binaries only")
    if arch not in _ELF:
        return Support(
            platform, "missing", reason=f"dockbuild knows no emulator for the {arch} architecture"
        )
    header = elf_program(arch)
    interpreter = qemu_name(arch)
    if _binfmt_readable():
        matching = [e for e in binfmt_entries() if e.matches(header)]
        enabled = [e for e in matching if e.enabled]
        # The kernel tries the newest entry first, which the files do not tell: any
        # matching entry without F is refused rather than guessed past.
        without_f = [e for e in enabled if not e.fix_binary]
        if without_f:
            entry = without_f[0]
            return Support(
                platform,
                "refused",
                entry,
                f"the binfmt_misc entry {entry.name} (interpreter {entry.interpreter}) has no "
                "F flag: the kernel would look for its interpreter inside each step's rootfs, "
                "where the image has no such file",
            )
        if enabled:
            return Support(platform, "emulated", enabled[0])
        if _executes(header):
            return Support(platform, "native")
        if matching:
            return Support(
                platform,
                "missing",
                matching[0],
                f"the binfmt_misc entry {matching[0].name} for its binaries is disabled",
            )
        return Support(
            platform, "missing", reason=f"no binfmt_misc emulator is registered for its binaries ({interpreter})"
        )
    if _executes(header):
        return Support(platform, "runs")
    return Support(
        platform,
        "missing",
        reason=f"its binaries do not execute, and binfmt_misc is not mounted at {BINFMT_DIR} "
        f"to tell why (no emulator, {interpreter}, is registered for this machine, or it "
        "lacks the F flag)",
    )


def qemu_name(arch: str) -> str:
    """QEMU's user-mode emulator for a Go architecture name: ``qemu-aarch64`` for arm64."""
    return "qemu-" + _ELF[arch][4] if arch in _ELF else f"qemu-{arch}"


def _hint(platform: str, support: Support) -> str:
    arch = platforms.split(platform)[1]
    interpreter = qemu_name(arch)
    if support.how == "refused" and support.entry is not None:
        return (
            f"register {support.entry.name} anew with the F (fix-binary) flag: "
            f"echo -1 > {BINFMT_DIR}/{support.entry.name}, then write its line from "
            f"/usr/lib/binfmt.d/{interpreter}.conf, flags ending in F, to {BINFMT_DIR}/register"
        )
    if support.entry is not None:
        return f"enable it: echo 1 > {BINFMT_DIR}/{support.entry.name}"
    if arch not in _ELF or platforms.split(platform)[0] != "linux":
        return "build for a platform this machine can run: dockbuild debug info lists them"
    return (
        f"install QEMU's user-mode emulators and register {interpreter} with the F flag: "
        "apt-get install qemu-user-static (Debian; systemd-binfmt or binfmt-support registers "
        "its entries, which carry F). Where neither runs (a container, a VM without systemd): "
        f"mount -t binfmt_misc binfmt_misc {BINFMT_DIR}; cat /usr/lib/binfmt.d/{interpreter}.conf "
        f"> {BINFMT_DIR}/register (as root on the host; `docker run --privileged --rm "
        f"tonistiigi/binfmt --install {arch}` registers the same)"
    )


def _binfmt_readable() -> bool:
    return (BINFMT_DIR / "status").exists()


def binfmt_entries() -> list[BinfmtEntry]:
    """The magic-type entries registered with binfmt_misc (none when it is disabled as a
    whole: ``status`` says so)."""
    try:
        if (BINFMT_DIR / "status").read_text().strip() != "enabled":
            return []
        names = sorted(os.listdir(BINFMT_DIR))
    except OSError:
        return []
    entries = []
    for name in names:
        if name in ("register", "status"):
            continue
        try:
            entry = parse_entry(name, (BINFMT_DIR / name).read_text())
        except OSError:
            continue  # removed meanwhile
        if entry is not None:
            entries.append(entry)
    return entries


def parse_entry(name: str, text: str) -> BinfmtEntry | None:
    """An entry's file (``enabled``, ``interpreter ...``, ``flags: POF``, ``offset 0``,
    ``magic 7f45...``, ``mask ff...``); None for an extension-type entry."""
    fields: dict[str, str] = {}
    lines = text.splitlines()
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        fields[key.rstrip(":")] = value.strip()
    if "magic" not in fields:
        return None
    try:
        return BinfmtEntry(
            name=name,
            enabled=bool(lines) and lines[0].strip() == "enabled",
            interpreter=fields.get("interpreter", ""),
            flags=fields.get("flags", ""),
            offset=int(fields.get("offset", "0")),
            magic=bytes.fromhex(fields["magic"]),
            mask=bytes.fromhex(fields.get("mask", "")),
        )
    except ValueError:
        return None


def elf_program(arch: str) -> bytes:
    """A static ELF executable of ``arch`` that exits 0: one PT_LOAD segment, no sections.
    Its first bytes are what binfmt_misc entries are matched against."""
    import struct

    elf_class, data, machine, flags, _, code = _ELF[arch]
    order = "<" if data == 1 else ">"
    if elf_class == 2:
        ehsize, phsize = 64, 56
        entry = _LOAD_ADDRESS + ehsize + phsize
        header_rest = struct.pack(
            order + "HHIQQQIHHHHHH", 2, machine, 1, entry, ehsize, 0, flags, ehsize, phsize, 1, 0, 0, 0
        )
        size = ehsize + phsize + len(code)
        phdr = struct.pack(order + "IIQQQQQQ", 1, 5, 0, _LOAD_ADDRESS, _LOAD_ADDRESS, size, size, 0x1000)
    else:
        ehsize, phsize = 52, 32
        entry = _LOAD_ADDRESS + ehsize + phsize
        header_rest = struct.pack(
            order + "HHIIIIIHHHHHH", 2, machine, 1, entry, ehsize, 0, flags, ehsize, phsize, 1, 0, 0, 0
        )
        size = ehsize + phsize + len(code)
        phdr = struct.pack(order + "IIIIIIII", 1, 0, _LOAD_ADDRESS, _LOAD_ADDRESS, size, size, 5, 0x1000)
    ident = b"\x7fELF" + bytes((elf_class, data, 1, 0)) + bytes(8)
    return ident + header_rest + phdr + code


def _executes(program: bytes) -> bool:
    """Whether the kernel runs ``program`` here (natively or through an emulator).

    From an anonymous memory file (memfd), so that a noexec /tmp does not matter; from a
    temporary file where memfds may not be executed (vm.memfd_noexec)."""
    import subprocess
    import tempfile

    def run(path: str, fds: tuple[int, ...] = ()) -> bool:
        try:
            done = subprocess.run([path], capture_output=True, timeout=10, pass_fds=fds)
        except (OSError, subprocess.SubprocessError):
            return False  # ENOEXEC (exec format error), a refused exec, a hung emulator
        return done.returncode == 0

    try:
        fd = os.memfd_create("dockbuild-archprobe")
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            os.write(fd, program)
            if run(f"/proc/self/fd/{fd}", (fd,)):
                return True
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="dockbuild-archprobe-") as tmp:
        path = Path(tmp) / "probe"
        path.write_bytes(program)
        path.chmod(0o700)
        return run(str(path))
