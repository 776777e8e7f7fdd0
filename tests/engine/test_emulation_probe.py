"""The emulation probe: binfmt_misc entries parsed and matched as the kernel does, and the
tiny per-architecture programs it executes really being programs of those architectures."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dockbuild.engine.executor import emulation
from dockbuild.errors import ExecutorError

# arch -> the qemu-user-static emulator that runs its programs (amd64 and 386 run here)
EMULATORS = {
    "arm64": "qemu-aarch64-static",
    "arm": "qemu-arm-static",
    "riscv64": "qemu-riscv64-static",
    "ppc64le": "qemu-ppc64le-static",
    "s390x": "qemu-s390x-static",
}
AARCH64_ENTRY = """\
enabled
interpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P
flags: POF
offset 0
magic 7f454c460201010000000000000000000200b700
mask ffffffffffffff00fffffffffffffffffeffffff
"""


@pytest.mark.parametrize("arch", ["amd64", "386", *EMULATORS])
def test_each_probe_program_exits_zero_on_its_architecture(arch: str, tmp_path: Path) -> None:
    program = tmp_path / arch
    program.write_bytes(emulation.elf_program(arch))
    program.chmod(0o755)
    if arch in ("amd64", "386"):
        command = [str(program)]
    else:
        from registry_fixture import require_binary

        command = [require_binary(EMULATORS[arch], "qemu-user-static"), str(program)]
    assert subprocess.run(command, capture_output=True).returncode == 0


def test_an_entry_is_parsed_and_matches_only_its_architecture() -> None:
    entry = emulation.parse_entry("qemu-aarch64", AARCH64_ENTRY)
    assert entry is not None
    assert (entry.enabled, entry.fix_binary, entry.interpreter) == (
        True, True, "/usr/libexec/qemu-binfmt/aarch64-binfmt-P",
    )  # fmt: skip
    assert entry.matches(emulation.elf_program("arm64"))
    for other in ("amd64", "386", "arm", "riscv64", "ppc64le", "s390x"):
        assert not entry.matches(emulation.elf_program(other))
    disabled = emulation.parse_entry("x", AARCH64_ENTRY.replace("enabled", "disabled", 1))
    assert disabled is not None and not disabled.enabled
    no_f = emulation.parse_entry("x", AARCH64_ENTRY.replace("POF", "PO"))
    assert no_f is not None and not no_f.fix_binary


def test_an_extension_entry_is_not_a_magic_entry() -> None:
    text = "enabled\ninterpreter /usr/bin/java\nflags: \nextension .jar\n"
    assert emulation.parse_entry("jar", text) is None


def test_the_host_platform_always_runs_and_other_oses_never() -> None:
    from dockbuild import platforms

    emulation.require_runnable(platforms.host())
    with pytest.raises(ExecutorError, match="runs Linux binaries only"):
        emulation.require_runnable("windows/amd64")
    with pytest.raises(ExecutorError, match="knows no emulator for the sparc64"):
        emulation.require_runnable("linux/sparc64")
