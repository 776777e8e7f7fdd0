"""The root network: a veth pair per step on the ``dockbuild0`` bridge, NAT to the outside.

Builds running at once share the bridge: ``/run/dockbuild/network.lock`` is held
exclusively while the bridge and NAT are made or removed, and ``network.users`` shared by
every build using them, so the last one out (the one that gets it exclusively) removes
them. A step's address is derived from its host-side veth's interface index, unique on
the host while the veth exists, so concurrent builds need no address bookkeeping.

One worker thread does all netlink work (pyroute2 sockets belong to the thread that
made them): it keeps a few namespaces ready (``POOL``) while steps run, and deletes a
finished step's veth off the step's path.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import queue
import threading
from typing import Any

from dockbuild.engine.network import (
    BRIDGE,
    DEFAULT_SUBNETS,
    NetworkUnavailable,
    StepNetwork,
    fd_path,
    nat,
    resolv_conf,
)

STATE_DIR = "/run/dockbuild"
POOL = 2
VETH_PREFIX = "dbv"


def _lock(name: str, how: int) -> int:
    os.makedirs(STATE_DIR, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(STATE_DIR, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, how)
    return fd


class BridgeNetworks:
    kind = "bridge"

    def __init__(self, subnet: ipaddress.IPv4Network, users_fd: int, nat_kind: str) -> None:
        self.subnet = subnet
        self.gateway = str(next(subnet.hosts()))
        self.nat = nat_kind
        self._users_fd = users_fd
        self._resolv = resolv_conf()
        self._ready: queue.Queue[StepNetwork | BaseException] = queue.Queue()
        self._garbage: list[tuple[str, int]] = []  # (host veth, netns fd) to delete
        self._wake = threading.Condition()
        self._wanted = POOL
        self._closed = False
        self._serial = 0
        self._worker = threading.Thread(target=self._work, name="dockbuild-network", daemon=True)
        self._worker.start()

    @classmethod
    def open(cls, configured: str | None) -> BridgeNetworks:
        setup = _lock("network.lock", fcntl.LOCK_EX)
        try:
            users = _lock("network.users", fcntl.LOCK_SH)
            try:
                from pyroute2 import IPRoute

                with IPRoute() as ipr:
                    subnet, created = _ensure_bridge(ipr, configured)
                    sweep_veths(ipr)
                    if created:  # else a build still running (or a dead one) made both
                        nat.install(BRIDGE, str(subnet))
                        _enable_forwarding(ipr, BRIDGE)
                nat_kind = nat.backend()[0] or "none"
            except BaseException:
                os.close(users)
                raise
        finally:
            os.close(setup)
        return cls(subnet, users, nat_kind)

    def take(self) -> StepNetwork:
        with self._wake:
            self._wanted += 1
            self._wake.notify()
        got = self._ready.get()
        if isinstance(got, BaseException):
            raise NetworkUnavailable(f"cannot make the step's network: {got}")
        return got

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._worker.join(10)
        while True:
            try:
                got = self._ready.get_nowait()
            except queue.Empty:
                break
            if isinstance(got, StepNetwork):
                got.release()  # only closes the descriptor now that the worker is gone
        for _veth, fd in self._garbage:
            with contextlib.suppress(OSError):
                os.close(fd)
        os.close(self._users_fd)
        teardown(only_if_unused=True)

    # -- the worker ----------------------------------------------------------------------

    def _work(self) -> None:
        from pyroute2 import IPRoute

        host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with IPRoute() as host:
                bridge = host.link_lookup(ifname=BRIDGE)[0]
                while True:
                    with self._wake:
                        while not self._closed and not self._garbage and self._wanted <= 0:
                            self._wake.wait()
                        if self._closed:
                            garbage, self._garbage = self._garbage, []
                            self._delete(host, garbage)
                            return
                        garbage, self._garbage = self._garbage, []
                        make = self._wanted > 0
                        if make:
                            self._wanted -= 1
                    self._delete(host, garbage)
                    if make:
                        try:
                            self._ready.put(self._make(host, host_fd, bridge))
                        except Exception as e:
                            self._ready.put(e)
        except Exception as e:  # the bridge vanished under us, ...
            for _ in range(POOL + 8):
                self._ready.put(e)
        finally:
            os.close(host_fd)

    def _make(self, host: Any, host_fd: int, bridge: int) -> StepNetwork:
        from pyroute2 import IPRoute

        from dockbuild.engine.executor.forkserver.syscalls import CLONE_NEWNET, setns, unshare

        self._serial += 1
        veth = f"{VETH_PREFIX}{os.getpid():x}.{self._serial:x}"[:15]
        unshare(CLONE_NEWNET)  # this thread only: it returns to the host's below
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with IPRoute() as inside:  # its socket is made now, in the new namespace
                inside.link("set", index=inside.link_lookup(ifname="lo")[0], state="up")
                inside.link("add", ifname="eth0", kind="veth", peer={"ifname": veth, "net_ns_fd": host_fd})
                index = host.link_lookup(ifname=veth)[0]
                address = self.subnet.network_address + 2 + index % (self.subnet.num_addresses - 3)
                eth0 = inside.link_lookup(ifname="eth0")[0]
                inside.addr("add", index=eth0, address=str(address), prefixlen=self.subnet.prefixlen)
                inside.link("set", index=eth0, state="up")
                inside.route("add", dst="0.0.0.0/0", gateway=self.gateway)
            host.link("set", index=index, master=bridge, state="up")
        except BaseException:
            os.close(fd)
            raise
        finally:
            setns(host_fd, CLONE_NEWNET)

        def release() -> None:
            with self._wake:
                if self._closed and not self._worker.is_alive():
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    return
                self._garbage.append((veth, fd))
                self._wake.notify()

        return StepNetwork(fd_path(fd), self._resolv, release)

    @staticmethod
    def _delete(host: Any, garbage: list[tuple[str, int]]) -> None:
        for veth, fd in garbage:
            with contextlib.suppress(Exception):
                host.link("del", ifname=veth)
            with contextlib.suppress(OSError):
                os.close(fd)


def _ensure_bridge(ipr: Any, configured: str | None) -> tuple[ipaddress.IPv4Network, bool]:
    """The bridge's range, and whether the bridge was made now."""
    found = ipr.link_lookup(ifname=BRIDGE)
    if found:
        for msg in ipr.get_addr(index=found[0], family=2):
            net = ipaddress.IPv4Network(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}", strict=False)
            if configured is None or str(net) == configured:
                return net, False
        # A bridge with another range (config.toml changed while no build ran): anew.
        ipr.link("del", index=found[0])
        nat.remove(BRIDGE, configured or DEFAULT_SUBNETS[0])
    subnet = ipaddress.IPv4Network(configured) if configured else _free_subnet(ipr)
    try:
        ipr.link("add", ifname=BRIDGE, kind="bridge")
    except Exception as e:
        raise NetworkUnavailable(f"cannot create the bridge {BRIDGE}: {e}") from None
    index = ipr.link_lookup(ifname=BRIDGE)[0]
    ipr.addr("add", index=index, address=str(next(subnet.hosts())), prefixlen=subnet.prefixlen)
    ipr.link("set", index=index, state="up")
    return subnet, True


def _free_subnet(ipr: Any) -> ipaddress.IPv4Network:
    """The first of DEFAULT_SUBNETS that overlaps none of the host's routes."""
    taken = []
    for route in ipr.get_routes(family=2):
        dst = route.get_attr("RTA_DST")
        if dst:
            taken.append(ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False))
    for candidate in DEFAULT_SUBNETS:
        net = ipaddress.IPv4Network(candidate)
        if not any(net.overlaps(t) for t in taken):
            return net
    raise NetworkUnavailable(
        "every default range for the bridge overlaps a route of this host",
        hint="set network.subnet in config.toml",
    )


def _enable_forwarding(ipr: Any, bridge: str) -> None:
    """Forwarding for packets from the bridge; where the host does not forward already,
    also on the interfaces of its default routes, which receive the replies."""
    names = [bridge]
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        if f.read().strip() == "0":
            for route in ipr.get_default_routes(family=2):
                index = route.get_attr("RTA_OIF")
                if index is not None:
                    names += [link.get_attr("IFLA_IFNAME") for link in ipr.get_links(index)]
    for name in names:
        with open(f"/proc/sys/net/ipv4/conf/{name}/forwarding", "w") as f:
            f.write("1")


def sweep_veths(ipr: Any) -> None:
    """Delete the veths of builds that died (their owner pid is in the name)."""
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME") or ""
        if not name.startswith(VETH_PREFIX):
            continue
        owner = name[len(VETH_PREFIX):].split(".")[0]
        with contextlib.suppress(ValueError):
            if not os.path.exists(f"/proc/{int(owner, 16)}"):
                with contextlib.suppress(Exception):
                    ipr.link("del", index=link["index"])


def teardown(only_if_unused: bool) -> bool:
    """Remove the bridge and the NAT rules when no build uses them (or in any case);
    whether they were removed."""
    if not os.path.isdir(STATE_DIR) and not only_if_unused:
        os.makedirs(STATE_DIR, exist_ok=True)
    setup = _lock("network.lock", fcntl.LOCK_EX)
    try:
        users = os.open(os.path.join(STATE_DIR, "network.users"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if only_if_unused:
                    return False
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                subnets = []
                for index in ipr.link_lookup(ifname=BRIDGE):
                    for msg in ipr.get_addr(index=index, family=2):
                        subnets.append(str(ipaddress.ip_network(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}", strict=False)))
                    ipr.link("del", index=index)
                sweep_veths(ipr)
            for subnet in subnets or [DEFAULT_SUBNETS[0]]:
                nat.remove(BRIDGE, subnet)
            return True
        finally:
            os.close(users)
    finally:
        os.close(setup)
