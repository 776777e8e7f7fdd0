"""Executors: run one process on a rootfs with mounts, and report its exit status.

One interface, several back ends: ``namespace`` (built in,
the default), ``runc`` and ``chroot``; :mod:`.choice` picks one. The engine builds a
:class:`RunRequest` and calls :meth:`Executor.run`; nothing outside this package knows
how a container is made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dockbuild.engine.network import BuildNetwork


@dataclass(frozen=True)
class OverlayRootfs:
    """An overlay of read-only layer dirs (top first) with a writable upper dir.

    The executor mounts it inside the container's own mount namespace, so nothing stays
    mounted on the host after the run. ``upperdir`` and ``workdir`` are empty dirs on the
    same filesystem; afterwards ``upperdir`` holds exactly the process's changes in
    overlay format (whiteouts as 0:0 char devices, opaque dirs by xattr).
    """

    lowerdirs: tuple[str, ...]
    upperdir: str
    workdir: str


@dataclass(frozen=True)
class PlainRootfs:
    """A writable directory used as the rootfs directly (chroot / copy snapshotter)."""

    path: str


@dataclass(frozen=True)
class ExecMount:
    """A mount inside the container, made after the rootfs is mounted.

    Types:
    - ``bind``: ``source`` (a host file or dir; ``subpath`` below it) at ``target``;
    - ``overlay``: the merged view of ``lowerdirs`` (top first), writable into
      ``upperdir``/``workdir`` when given (the caller discards them: rw bind mounts),
      else read-only; ``subpath`` below its root is what is mounted;
    - ``tmpfs``: ``options`` such as ``("size=65536k",)``;
    - ``secret``: ``data`` as a file on a private tmpfs, with ``mode``/``uid``/``gid``;
      the bytes never touch a disk.
    """

    target: str  # absolute path inside the container
    type: str  # "bind" | "overlay" | "tmpfs" | "secret"
    source: str = ""  # host path for bind
    readonly: bool = False
    options: tuple[str, ...] = ()  # extra mount options, e.g. ("size=65536k",) for tmpfs
    subpath: str = ""  # bind / overlay: a path inside the source, resolved in it
    lowerdirs: tuple[str, ...] = ()
    upperdir: str = ""
    workdir: str = ""
    data: bytes = field(default=b"", repr=False)
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class RunRequest:
    """One process to run, the way BuildKit's runc executor would run it.

    ``args[0]`` without a slash is looked up in the PATH of ``env``; a missing command
    exits 127 with a message on stderr. ``cwd`` is created (owned by root) when missing.
    stdin is /dev/null. Mount targets missing from the rootfs are created as stubs and
    removed again afterwards if the process left them empty, so they never reach a layer.
    """

    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    rootfs: OverlayRootfs | PlainRootfs
    user: str = ""  # "" = root; "name[:group]" or "uid[:gid]", resolved in the rootfs
    mounts: tuple[ExecMount, ...] = ()
    # "default": a network of its own with outbound NAT (engine.network; the host's where
    # that is impossible or config.toml says so) | "none" | "host"
    network: str = "default"
    hostname: str = "buildkitsandbox"
    extra_hosts: tuple[str, ...] = ()  # "name:ip" lines for /etc/hosts (--add-host)
    shm_size: int = 0  # bytes of /dev/shm; 0 = 64 MiB, as docker's default
    # "sandbox": docker's default capabilities, masked /proc paths, read-only /sys;
    # "insecure": every capability and nothing masked (RUN --security=insecure).
    security: str = "sandbox"


# How to give a docker container what the sandboxed executors need.
LOCKED_DOWN_HINT = (
    "in a docker container, run with --security-opt seccomp=unconfined "
    "--security-opt apparmor=unconfined (or --privileged) for sandboxed RUN steps"
)

# Not root, and no user namespaces (a default container's seccomp profile refuses them):
# nothing can chown or chroot. The smallest changes that make builds work.
NON_ROOT_HINT = (
    "a non-root user needs user namespaces, which this container's seccomp/AppArmor "
    "profile refuses; any one of these fixes it: run the container as root (docker: "
    "--user 0; Kubernetes: securityContext.runAsUser: 0), which builds in a bare chroot; "
    "or allow user namespaces for sandboxed RUN steps (docker: --security-opt "
    "seccomp=unconfined --security-opt apparmor=unconfined; Kubernetes: "
    "securityContext.seccompProfile.type: Unconfined and "
    "securityContext.appArmorProfile.type: Unconfined, or the annotation "
    "container.apparmor.security.beta.kubernetes.io/<container>: unconfined before 1.30)"
)

# ``--add-host NAME:host-gateway`` stays symbolic in the graph (and so in cache keys): the
# executor names the host as the step's network reaches it (``host_gateway``).
HOST_GATEWAY = "host-gateway"
# The host as a step on the host's network (--network=host, or a fallback to it) reaches it.
HOST_LOOPBACK_IP = "127.0.0.1"


def parse_extra_host(value: str) -> str:
    """docker's ``--add-host`` value as ``name:ip``: ``name:ip`` or ``name=ip``, an IPv6
    address maybe in brackets, ``host-gateway`` for the host. ValueError if malformed."""
    import ipaddress

    name, sep, address = value.partition("=")
    if not sep:
        name, sep, address = value.partition(":")
    if not sep or not name or any(c.isspace() for c in name):
        raise ValueError(f"bad format for add-host: {value!r} (expected HOST:IP or HOST=IP)")
    if address == HOST_GATEWAY:
        return f"{name}:{HOST_GATEWAY}"
    if len(address) > 2 and address[0] == "[" and address[-1] == "]":
        address = address[1:-1]
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"invalid IP address in add-host: {address!r}") from None
    return f"{name}:{address}"


def host_gateway(extra_hosts: Sequence[str], address: str) -> list[str]:
    """``--add-host`` lines with ``host-gateway`` replaced by ``address``, the host as
    the step's network reaches it (docker's bridge gateway, as ``docker build`` does)."""
    suffix = ":" + HOST_GATEWAY
    return [h[: -len(suffix)] + ":" + address if h.endswith(suffix) else h for h in extra_hosts]


# Receives ("stdout" | "stderr", bytes) chunks as the process writes them.
OutputSink = Callable[[str, bytes], None]


class Executor(Protocol):
    name: str
    # Whether it can mount (an overlay rootfs, RUN --mount); an executor that cannot
    # gets a plain directory rootfs from the copy snapshotter.
    mounts: bool
    # Set when this executor was chosen as a fallback the user should hear about.
    warning: str | None
    # The isolated networks of ``--network=default`` steps: the build's, which the solver
    # opens and releases (an executor used on its own makes its own); close() releases them.
    network: BuildNetwork

    def run(self, request: RunRequest, output: OutputSink) -> int:
        """Run the process to completion; return its exit status (128+N for signal N).

        Raises ExecutorError when the container cannot be set up (an unknown USER
        included: "unable to find user NAME"). Thread-safe: the solver calls it from
        several threads at once.
        """
        ...

    def start(self) -> None:
        """Start helper processes now, so the first run does not wait for them (the
        solver calls it when it finds a RUN step that will run)."""
        ...

    def close(self) -> None:
        """Stop helper processes; kill anything still running."""
        ...


__all__ = [
    "LOCKED_DOWN_HINT",
    "NON_ROOT_HINT",
    "ExecMount",
    "Executor",
    "OutputSink",
    "OverlayRootfs",
    "PlainRootfs",
    "RunRequest",
    "parse_extra_host",
    "host_gateway",
]
