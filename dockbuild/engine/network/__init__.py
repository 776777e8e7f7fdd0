"""RUN steps' networks: an isolated namespace per step with outbound NAT (the default mode).

As root (:mod:`.bridge`): a veth pair per step on the ``dockbuild0`` bridge, masquerading
in dockbuild's own nftables table (:mod:`.nat`). Rootless (:mod:`.slirp`): one namespace
per build, connected by slirp4netns or pasta. Namespaces are held by descriptors of this
process (never bind-mounted), so they vanish with the build, even after ``kill -9``; the
executors join one by its ``/proc/<pid>/fd/<n>`` path. pyroute2 is imported only here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from dockbuild.errors import DockbuildError

# The namespaces' range and the bridge when config.toml's [network] does not say.
DEFAULT_SUBNETS = ("10.88.0.0/16", "10.89.0.0/16", "10.90.0.0/16", "172.29.0.0/16")
BRIDGE = "dockbuild0"
# docker's resolvers when the host has only loopback ones and nothing upstream is known.
FALLBACK_NAMESERVERS = ("8.8.8.8", "8.8.4.4")


class NetworkUnavailable(DockbuildError):
    """Isolation is impossible here; the message says why (the step falls back to host)."""


class Settings(NamedTuple):
    """config.toml's ``[network]``: ``default`` ("isolated" or "host"), ``subnet``."""

    default: str = "isolated"
    subnet: str | None = None


def settings(data: dict[str, Any] | None = None) -> Settings:
    from dockbuild import config

    table = (config.load() if data is None else data).get("network", {})
    if not isinstance(table, dict):
        raise DockbuildError("config.toml: [network] must be a table")
    default = table.get("default", "isolated")
    if default not in ("isolated", "host"):
        raise DockbuildError(
            f"config.toml: network.default must be \"isolated\" or \"host\", not {default!r}"
        )
    subnet = table.get("subnet")
    if subnet is not None:
        import ipaddress

        try:
            ipaddress.ip_network(subnet)
        except ValueError as e:
            raise DockbuildError(f"config.toml: network.subnet: {e}") from None
    return Settings(default, subnet)


def settings_or_defaults() -> tuple[Settings, str | None]:
    """The settings, or the defaults and why (a broken config is a warning, not a failed
    build; the warning is None for an unreadable file, which the build reports already)."""
    try:
        return settings(), None
    except DockbuildError as e:
        said = e.message.startswith(("invalid config", "cannot read config"))
        return Settings(), None if said else f"{e.message}; RUN steps get the isolated network"


class StepNetwork(NamedTuple):
    """A network namespace ready for one step: join ``path``; ``release`` when done."""

    path: str
    resolv_conf: str
    host_address: str  # the host as the step reaches it (``--add-host NAME:host-gateway``)
    release: Callable[[], None]


class Networks(Protocol):
    kind: str  # "bridge" | "slirp4netns" | "pasta"

    def take(self) -> StepNetwork: ...

    def close(self) -> None: ...


def open_networks(settings_: Settings) -> Networks:
    """The isolated networks for this build; NetworkUnavailable says why there are none."""
    from dockbuild.userns import in_user_namespace

    reason = unavailable_reason()
    if reason is not None:
        raise NetworkUnavailable(reason)
    if in_user_namespace():
        from dockbuild.engine.network.slirp import SlirpNetwork

        return SlirpNetwork.open()
    from dockbuild.engine.network.bridge import BridgeNetworks

    return BridgeNetworks.open(settings_.subnet)


def unavailable_reason() -> str | None:
    """Why this process (where builds run) cannot isolate RUN steps, if it can tell now."""
    from dockbuild.userns import in_user_namespace

    if in_user_namespace():
        from dockbuild.engine.network.slirp import find_tool

        if find_tool() is None:
            return "rootless, and neither slirp4netns nor pasta is installed"
        if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            return "rootless, and /dev/net/tun is missing or not usable by this user"
        return None
    if not _has_net_admin():
        return "no CAP_NET_ADMIN (a container's root)"
    from dockbuild.engine.network.nat import backend

    nat, why = backend()
    return None if nat else why


def _has_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 12 & 1)  # CAP_NET_ADMIN
    except (OSError, ValueError):
        pass
    return False


def new_netns() -> int:
    """A descriptor of a fresh network namespace, made by a short-lived thread (unshare
    changes only the calling thread; the namespace lives as long as the descriptor)."""
    from dockbuild.engine.executor.forkserver.syscalls import CLONE_NEWNET, unshare

    result: list[int | BaseException] = []

    def make() -> None:
        try:
            unshare(CLONE_NEWNET)
            result.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        except BaseException as e:
            result.append(e)

    thread = threading.Thread(target=make, name="dockbuild-netns")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def fd_path(fd: int) -> str:
    return f"/proc/{os.getpid()}/fd/{fd}"


def resolv_conf(replacement: tuple[str, ...] | None = None) -> str:
    """/etc/resolv.conf for a step's own network (see :func:`step_resolv_conf`)."""
    return step_resolv_conf(
        _read("/etc/resolv.conf"), _read("/run/systemd/resolve/resolv.conf"), replacement
    )


def step_resolv_conf(host: str, upstream: str, replacement: tuple[str, ...] | None) -> str:
    """The host's resolv.conf as docker rewrites it for a bridge network: nameservers on
    the host's loopback (unreachable from the step's namespace) dropped. With none left:
    ``replacement`` (the slirp/pasta resolver), else the ``upstream`` file's servers
    (systemd-resolved's), else docker's fallback (8.8.8.8, 8.8.4.4)."""
    kept, dropped = _without_loopback(host)
    if not dropped:
        return host
    if any(line.split()[:1] == ["nameserver"] for line in kept):
        return "\n".join(kept) + "\n"
    servers = replacement
    if servers is None:
        found, _ = _without_loopback(upstream)
        servers = tuple(
            line.split()[1] for line in found if line.split()[:1] == ["nameserver"] and len(line.split()) > 1
        )
    servers = servers or FALLBACK_NAMESERVERS
    return "\n".join([*kept, *(f"nameserver {s}" for s in servers)]) + "\n"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _without_loopback(text: str) -> tuple[list[str], bool]:
    import ipaddress

    kept: list[str] = []
    dropped = False
    for line in text.splitlines():
        words = line.split()
        if len(words) > 1 and words[0] == "nameserver":
            try:
                if ipaddress.ip_address(words[1].split("%")[0]).is_loopback:
                    dropped = True
                    continue
            except ValueError:
                pass
        kept.append(line)
    return kept, dropped


def describe(settings_: Settings, executor: str | None) -> dict[str, object]:
    """What ``dockbuild debug info`` shows: the default mode, the bridge, NAT and why."""
    from dockbuild.userns import in_user_namespace, mode

    info: dict[str, object] = {"default": settings_.default}
    if settings_.default == "host":
        info.update(mode="host", reason="config.toml sets network.default = \"host\"")
        return info
    if executor in ("chroot", None):
        info.update(mode="host", reason=f"the {executor or 'missing'} executor cannot isolate RUN steps")
        return info
    if in_user_namespace() or mode() == "none":
        from dockbuild.engine.network.slirp import find_tool

        tool = find_tool()
        why_not = unavailable_reason() if in_user_namespace() else None
        if tool is not None and why_not is None and not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            why_not = "/dev/net/tun is missing or not usable by this user"
        info.update(mode="rootless" if tool and not why_not else "host", tool=tool[0] if tool else None)
        info["reason"] = (
            f"rootless: one namespace per build, connected by {tool[0]}" if tool and not why_not
            else f"{why_not or 'rootless, and neither slirp4netns nor pasta is installed'}: steps use the host's network"
        )
        return info
    if not _has_net_admin():
        info.update(mode="host", reason="no CAP_NET_ADMIN: steps use the host's network")
        return info
    from dockbuild.engine.network.nat import backend

    nat, why = backend()
    info.update(mode="bridge", bridge=BRIDGE, subnet=settings_.subnet or "auto", nat=nat, reason=why)
    return info


class BuildNetwork:
    """A build's networks, held by a thread of their own from when the solver finds an
    isolated step that will run (``prepare``: opened beside the executor's probe and the
    step's inputs) until the last step ran (``finish``: released beside the export). One
    thread for both: pasta dies with the thread that started it. Executors take each
    step's network from it (``step``).

    ``step`` gives None where the step must use the host's network: config.toml's
    ``network.default = "host"``, or isolation impossible here (said once, as a warning
    on the step's output).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._opened = threading.Event()
        self._finishing = threading.Event()
        self._networks: Networks | None = None
        self._warnings: list[str] = []
        self._open_error: BaseException | None = None  # raised by every step
        self._error: BaseException | None = None  # raised by close

    def prepare(self) -> None:
        """A step that wants the isolated network will run: open the networks now."""
        with self._lock:
            if self._thread is None and not self._finishing.is_set():
                self._thread = threading.Thread(target=self._hold, name="dockbuild-network", daemon=True)
                self._thread.start()

    def step(self, output: Callable[[str, bytes], None]) -> StepNetwork | None:
        self.prepare()
        if self._thread is not None:
            self._opened.wait()
        with self._lock:
            if self._open_error is not None:
                raise self._open_error
            if self._finishing.is_set():  # never the host's network by mistake
                raise DockbuildError("the build's RUN networks were released; the build is ending")
            warnings, self._warnings = self._warnings, []
            networks = self._networks
        for warning in warnings:
            output("stderr", f"WARNING: {warning}\n".encode())
        return networks.take() if networks is not None else None

    def finish(self) -> None:
        """No step will run any more: release the networks in the background."""
        with self._lock:
            self._finishing.set()

    def close(self) -> None:
        """Release the networks (if ``finish`` has not begun it) and wait until they are."""
        self.finish()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _hold(self) -> None:
        try:
            self._open_networks()
        except BaseException as e:  # raised by step(), in the step's thread
            self._open_error = e
        finally:
            self._opened.set()
        self._finishing.wait()
        with self._lock:
            networks, self._networks = self._networks, None
        try:
            if networks is not None:
                networks.close()
        except BaseException as e:  # raised by close(), in the build's thread
            self._error = e

    def _open_networks(self) -> None:
        settings_, warning = settings_or_defaults()
        warnings = [warning] if warning is not None else []
        networks: Networks | None = None
        # Isolation impossible here: the executor's warning said so already.
        if settings_.default != "host" and unavailable_reason() is None:
            try:
                networks = open_networks(settings_)
            except (NetworkUnavailable, OSError) as e:
                reason = e.message if isinstance(e, DockbuildError) else str(e)
                warnings.append(f"RUN steps use the host's network: {reason}")
        with self._lock:
            self._networks, self._warnings = networks, warnings


def remove_unused() -> None:
    """``dockbuild prune --all``: remove the bridge, the nftables table and the iptables
    rules of RUN networks if no build is using them (as root; nothing to do rootless)."""
    from dockbuild.userns import in_user_namespace

    if os.geteuid() != 0 or in_user_namespace() or not os.path.isdir("/run/dockbuild"):
        return
    from dockbuild.engine.network.bridge import teardown

    teardown(rules_anyway=True)


def fallback_warning(executor: str) -> str | None:
    """The one-line warning for a build whose RUN steps cannot have their own network
    (a step that asks for the isolated default gets the host's instead)."""
    if settings_or_defaults()[0].default == "host":
        return None  # the user's choice
    if executor == "chroot":
        return "RUN steps use the host's network (the chroot executor cannot isolate it)"
    reason = unavailable_reason()
    return None if reason is None else f"RUN steps use the host's network: {reason}"
