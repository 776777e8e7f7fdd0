"""A chroot-mode RUN step cannot take the host over: each escape fails here, and works
on an unprotected control (the same program run by a plain ``chroot``).

The program (C, compiled statically at test time) tries, each in a child of its own:
reading dockbuild's files by path; an inherited directory descriptor (fchdir out of the
root); the double-chroot escape (chroot into a subdirectory, climb with chdir(".."),
chroot(".")); mounting /proc to read /proc/PID/root and /proc/PID/environ of its parent
(dockbuild's fork server); and ptrace of that parent. (Each attempt also reads the
files, once out.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from clitools import DockbuildCLI, write_context
from test_run_in_docker import docker_dockbuild, image, vol  # noqa: F401  (the fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the chroot executor needs root")

ESCAPE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *file0, *file1, *canary;
static pid_t parent;

/* Print the first line of each file (path relative to the cwd when rel). */
static void read_files(const char *name, int rel) {
    const char *paths[2] = {file0, file1};
    for (int i = 0; i < 2; i++) {
        char buf[256] = {0};
        int fd = open(rel ? paths[i] + 1 : paths[i], O_RDONLY);
        if (fd < 0) { printf("%s%d denied %s\n", name, i, strerror(errno)); continue; }
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n < 0) n = 0;
        buf[n] = 0;
        char *nl = strchr(buf, '\n'); if (nl) *nl = 0;
        printf("%s%d ok %s\n", name, i, buf);
    }
}

static void climb(void) { for (int i = 0; i < 64; i++) chdir(".."); }

static void try_fd(void) {
    for (int fd = 3; fd < 1024; fd++) {
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode) && fchdir(fd) == 0) {
            climb();
            read_files("fd", 1);
            return;
        }
    }
    printf("fd0 denied no directory descriptor\nfd1 denied no directory descriptor\n");
}

static void try_chroot(void) {
    mkdir("/.escape", 0755);
    if (chroot("/.escape") != 0) {
        printf("chroot0 denied %s\nchroot1 denied %s\n", strerror(errno), strerror(errno));
        return;
    }
    climb();
    chroot(".");
    read_files("chroot", 0);
}

static void try_proc(void) {
    char path[512];
    if (mount("proc", "/proc", "proc", 0, NULL) != 0) {
        printf("procroot denied %s\nenviron denied %s\n", strerror(errno), strerror(errno));
        return;
    }
    snprintf(path, sizeof path, "/proc/%d/root%s", (int)parent, file0);
    int fd = open(path, O_RDONLY);
    if (fd < 0) printf("procroot denied %s\n", strerror(errno));
    else { char buf[256] = {0}; read(fd, buf, 255); close(fd);
           char *nl = strchr(buf, '\n'); if (nl) *nl = 0; printf("procroot ok %s\n", buf); }
    snprintf(path, sizeof path, "/proc/%d/environ", (int)parent);
    fd = open(path, O_RDONLY);
    if (fd < 0) printf("environ denied %s\n", strerror(errno));
    else {
        static char env[65536]; ssize_t n = read(fd, env, sizeof env - 1); close(fd);
        int found = 0;
        for (ssize_t i = 0; n > 0 && i < n; i += strlen(env + i) + 1)
            if (strstr(env + i, canary)) found = 1;
        printf(found ? "environ ok %s\n" : "environ denied not readable%s\n", found ? canary : "");
    }
    umount2("/proc", MNT_DETACH);
}

static void try_ptrace(void) {
    if (ptrace(PTRACE_SEIZE, parent, 0, 0) != 0) printf("ptrace denied %s\n", strerror(errno));
    else printf("ptrace ok\n");
}

static void in_child(void (*attempt)(void)) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) { attempt(); fflush(stdout); _exit(0); }
    waitpid(pid, NULL, 0);
}

static void try_path(void) { read_files("path", 0); }

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    file0 = argv[1]; file1 = argv[2]; canary = argv[3];
    if (argc > 4 && !freopen(argv[4], "w", stdout)) return 3;
    parent = getppid();
    in_child(try_path);
    in_child(try_fd);
    in_child(try_chroot);
    in_child(try_proc);
    in_child(try_ptrace);
    rmdir("/.escape");
    return 0;
}
"""

ATTEMPTS = ("fd0", "fd1", "chroot0", "chroot1", "procroot", "environ", "ptrace")


def _report(text: str) -> dict[str, str]:
    lines = [line.split(" ", 1) for line in text.splitlines() if line.strip()]
    return {name: rest for name, rest in lines}


@pytest.fixture
def escape(tmp_path: Path) -> Path:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the escape program")
    source = tmp_path / "escape.c"
    source.write_text(ESCAPE_C)
    binary = tmp_path / "escape"
    done = subprocess.run(
        [cc, "-static", "-O1", "-o", str(binary), str(source)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot build a static program: {done.stderr.decode()[-300:]}")
    return binary


def test_a_chroot_step_cannot_escape_ptrace_or_read_dockbuilds_files(
    dockbuild: DockbuildCLI, tmp_path: Path, escape: Path
) -> None:
    canary = "dockbuild-canary-" + os.urandom(6).hex()
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    config = home / ".docker" / "config.json"
    config.write_text(f'{{"auths": {{"x": {{"auth": "{canary}-config"}}}}}}\n')
    dockbuild.root.mkdir(parents=True, exist_ok=True)
    in_cache = dockbuild.root / "planted-canary"
    in_cache.write_text(f"{canary}-cache\n")
    args = f"{config} {in_cache} CANARY_ENV={canary}"

    # The control: the same program under a plain chroot, given a directory descriptor,
    # its parent a root shell holding the canary in its environment.
    control_root = tmp_path / "control"
    (control_root / "proc").mkdir(parents=True)
    shutil.copy2(escape, control_root / "escape")
    slash = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        control = subprocess.run(
            ["sh", "-c", f"unshare -m chroot {control_root} /escape {args}; true"],
            env={"PATH": os.environ["PATH"], "CANARY_ENV": canary},
            pass_fds=[slash], capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        os.close(slash)
    unprotected = _report(control.stdout)
    assert {k: v.split()[0] for k, v in unprotected.items() if k in ATTEMPTS} == dict.fromkeys(
        ATTEMPTS, "ok"
    ), control.stdout
    assert unprotected["chroot0"] == f'ok {{"auths": {{"x": {{"auth": "{canary}-config"}}}}}}'
    assert unprotected["chroot1"] == f"ok {canary}-cache"
    # By path, outside any chroot, the files are readable: the test reads the right ones.
    direct = _report(subprocess.run([escape, *args.split()], capture_output=True, text=True).stdout)
    assert direct["path0"].startswith("ok") and direct["path1"] == f"ok {canary}-cache"

    ctx = write_context(
        tmp_path / "ctx",
        # The exec form: the program is the step's first process, its parent dockbuild's.
        {
            "Dockerfile": "FROM busybox\nCOPY escape /escape\nRUN "
            + json.dumps(["/escape", *args.split(), "/report"])
            + "\n"
        },
    )
    shutil.copy2(escape, ctx / "escape")
    out = tmp_path / "out"
    dockbuild.build(
        ctx, "--executor", "chroot", "-o", f"type=local,dest={out}",
        env={"HOME": str(home), "CANARY_ENV": canary},
    )  # fmt: skip
    report = (out / "report").read_text()
    protected = _report(report)
    for name in ("path0", "path1", *ATTEMPTS):
        assert protected[name].startswith("denied"), (name, report)
    assert canary not in report
    assert protected["chroot0"] == "denied Operation not permitted"
    assert protected["procroot"] == "denied Operation not permitted"
    assert protected["ptrace"] == "denied Operation not permitted"
    assert not (out / ".escape").exists()


@pytest.mark.docker
def test_in_a_default_docker_container_the_same_escapes_fail(
    image: str,  # noqa: F811  (the fixture imported above)
    vol: Path,  # noqa: F811
    escape: Path,
) -> None:
    # dockbuild falls back to chroot there. The control runs in the same kind of
    # container: a plain chroot, a directory descriptor, a root shell as the parent
    # (no /proc control: such a container cannot mount one either way).
    canary = "dockbuild-canary-" + os.urandom(6).hex()
    (vol / "home" / ".docker").mkdir(parents=True)
    (vol / "home" / ".docker" / "config.json").write_text(f"{canary}-config\n")
    (vol / "cache").mkdir(exist_ok=True)
    (vol / "cache" / "planted-canary").write_text(f"{canary}-cache\n")
    args = ["/vol/home/.docker/config.json", "/vol/cache/planted-canary", f"CANARY_ENV={canary}"]
    (vol / "control" / "proc").mkdir(parents=True)
    shutil.copy2(escape, vol / "control" / "escape")
    shutil.copy2(escape, vol / "ctx" / "escape")
    subprocess.run(["chmod", "-R", "a+rwX", str(vol)], check=True)
    control = subprocess.run(
        ["docker", "run", "--rm", "-v", "/usr:/usr:ro", "-v", f"{vol}:/vol", image,
         "/bin/sh", "-c", f"exec 9</; chroot /vol/control /escape {' '.join(args)}; true"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    unprotected = _report(control.stdout)
    for name in ("fd0", "fd1", "chroot0", "chroot1", "ptrace"):
        assert unprotected[name].startswith("ok"), (name, control.stdout)
    assert unprotected["chroot1"] == f"ok {canary}-cache"

    (vol / "ctx" / "Dockerfile").write_text(
        "FROM busybox\nCOPY escape /escape\nRUN " + json.dumps(["/escape", *args, "/report"]) + "\n"
    )
    run = docker_dockbuild(
        image, vol, "--progress=plain", "--build-context", "busybox=oci-layout:///vol/busybox",
        "-o", "type=local,dest=/vol/out", "/vol/ctx", options=("-e", f"CANARY_ENV={canary}"),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "bare chroot" in run.stderr
    report = (vol / "out" / "report").read_text()
    protected = _report(report)
    for name in ("path0", "path1", *ATTEMPTS):
        assert protected[name].startswith("denied"), (name, report)
    assert canary not in report
