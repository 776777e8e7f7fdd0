"""The root network: a veth pair per step on the ``dockbuild0`` bridge, NAT to the outside.

Builds running at once share the bridge: ``/run/dockbuild/network.lock`` is held
exclusively while the bridge and NAT are made or removed, and ``network.users`` shared by
every build using them, so the last one out (the one that gets it exclusively) removes
them. A step's address is derived from its host-side veth's interface index, unique on
the host while the veth exists, so concurrent builds need no address bookkeeping.

One worker thread makes the namespaces (it unshares, then builds each with batched
netlink requests, :mod:`.rtnl`): it keeps a few ready (``POOL``) while steps run. A
finished step only closes its descriptor: the kernel removes the namespace and its veth.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import queue
import socket
import threading
from collections.abc import Callable

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
SUBNET_RECORD = os.path.join(STATE_DIR, "network.subnet")  # the bridge's range
NAT_RECORD = os.path.join(STATE_DIR, "network.nat")  # the commands that undo the NAT
POOL = 2
VETH_PREFIX = "dbv"
# Host-side veths get interface index SLOT_INDEX + slot (far above what the kernel hands
# out by itself); at most MAX_SLOTS steps at once share the bridge.
SLOT_INDEX = 0x10000000
MAX_SLOTS = 1 << 16
# Device groups (IFLA_GROUP) of builds' veths: a random one each, far from the small
# numbers people give groups by hand. A build's veths, and at the end the bridge with
# them, are deleted by group: one request, one wait of the kernel's.
GROUP_FIRST = 0x64620000
GROUP_COUNT = 0x10000000


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
        # The device group of this build's host-side veths: removed in one request.
        self.group = GROUP_FIRST + int.from_bytes(os.urandom(4), "big") % GROUP_COUNT
        self._resolv = resolv_conf()
        self._ready: queue.Queue[StepNetwork | BaseException] = queue.Queue()
        self._wake = threading.Condition()
        self._wanted = POOL
        self._closed = False
        # Where this build starts looking for free addresses (see _make).
        self._next = int.from_bytes(os.urandom(4), "big") % self._slots
        self._worker = threading.Thread(target=self._work, name="dockbuild-network", daemon=True)
        self._worker.start()

    @property
    def _slots(self) -> int:
        return min(self.subnet.num_addresses - 3, MAX_SLOTS)

    @classmethod
    def open(cls, configured: str | None) -> BridgeNetworks:
        from dockbuild.engine.network import rtnl

        setup = _lock("network.lock", fcntl.LOCK_EX)
        try:
            users = _lock("network.users", fcntl.LOCK_SH)
            try:
                with rtnl.open_socket() as sock:
                    subnet, created = _ensure_bridge(sock, configured)
                    sweep_veths(sock, _dead)
                recorded = os.path.exists(NAT_RECORD)
                # The NAT is made with a new bridge, and made again for one without its
                # record: a build was killed while making it, or while removing the bridge
                # (the rules go beside the bridge's deletion). Else a build still running,
                # or a dead one, made both.
                if created or not recorded:
                    if recorded:  # a build killed while removing the rules
                        _remove_rules(str(subnet))
                    elif not created:  # whatever part of the NAT exists
                        nat.remove(BRIDGE, str(subnet))
                    atomic_write(NAT_RECORD, json.dumps(nat.install(BRIDGE, str(subnet))))
                    _enable_forwarding(BRIDGE)
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
                got.release()
        teardown(self.group, self._users_fd)

    # -- the worker ----------------------------------------------------------------------

    def _work(self) -> None:
        from dockbuild.engine.network import rtnl

        host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with rtnl.open_socket() as host:
                bridge = socket.if_nametoindex(BRIDGE)
                while True:
                    with self._wake:
                        while not self._closed and self._wanted <= 0:
                            self._wake.wait()
                        if self._closed:
                            return
                        self._wanted -= 1
                    try:
                        self._ready.put(self._make(host, host_fd, bridge))
                    except Exception as e:
                        self._ready.put(e)
        except Exception as e:  # the bridge vanished under us, ...
            for _ in range(POOL + 8):
                self._ready.put(e)
        finally:
            os.close(host_fd)

    def _make(self, host: socket.socket, host_fd: int, bridge: int) -> StepNetwork:
        """A namespace with ``lo`` up and ``eth0`` on the bridge, made by this thread.

        The step's address is the bridge's range + 2 + slot, and the host end's interface
        index is SLOT_INDEX + slot: an index is unique on the host, so builds running at
        once never share an address (a taken index fails with EEXIST: the next slot).
        """
        from dockbuild.engine.executor.forkserver.syscalls import CLONE_NEWNET, setns, unshare
        from dockbuild.engine.network import rtnl

        unshare(CLONE_NEWNET)  # this thread only: it returns to the host's below
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with rtnl.open_socket() as inside:  # made now, so in the new namespace
                rtnl.check(rtnl.request(inside, [rtnl.link_up(1)]), ["lo up"])
                for _attempt in range(64):
                    slot = self._next
                    self._next = (self._next + 1) % self._slots
                    veth = f"{VETH_PREFIX}{os.getpid():x}.{slot:x}"
                    ip = str(self.subnet.network_address + 2 + slot)
                    failed = rtnl.request(inside, [
                        rtnl.veth(2, "eth0", SLOT_INDEX + slot, veth, host_fd, self.group),
                        rtnl.address(2, ip, self.subnet.prefixlen),
                        rtnl.default_route(2, self.gateway),
                    ])  # fmt: skip
                    if not failed or failed[0] != (0, errno.EEXIST):
                        break
                rtnl.check(failed, ["veth " + veth, "address " + ip, "default route"])
            rtnl.check(rtnl.request(host, [rtnl.link_up(SLOT_INDEX + slot, bridge)]), ["bridge port"])
        except BaseException:
            os.close(fd)
            raise
        finally:
            setns(host_fd, CLONE_NEWNET)

        def release() -> None:
            # The namespace (and with it both ends of the veth) goes with its last
            # holder: the step's processes are gone, this descriptor is the last.
            with contextlib.suppress(OSError):
                os.close(fd)

        return StepNetwork(fd_path(fd), self._resolv, self.gateway, release)


def _ensure_bridge(sock: socket.socket, configured: str | None) -> tuple[ipaddress.IPv4Network, bool]:
    """The bridge's range, and whether the bridge was made now (the caller holds the
    setup lock; the range is kept beside it, in STATE_DIR)."""
    from dockbuild.engine.network import rtnl

    record = SUBNET_RECORD
    index = rtnl.link_index(BRIDGE)
    if index is not None:
        try:
            with open(record) as f:
                subnet = ipaddress.IPv4Network(f.read().strip())
        except (OSError, ValueError):
            subnet = None
        if subnet is not None and (configured is None or str(subnet) == configured):
            return subnet, False
        # Another range (config.toml changed while no build ran) or none known: anew.
        rtnl.check(rtnl.request(sock, [rtnl.delete_link(index)]), ["delete " + BRIDGE])
        _remove_rules(str(subnet or configured or DEFAULT_SUBNETS[0]))
    subnet = ipaddress.IPv4Network(configured) if configured else _free_subnet()
    try:
        rtnl.check(rtnl.request(sock, [rtnl.bridge(BRIDGE)]), ["create " + BRIDGE])
        index = rtnl.link_index(BRIDGE)
        assert index is not None
        rtnl.check(rtnl.request(sock, [
            rtnl.address(index, str(next(subnet.hosts())), subnet.prefixlen),
            rtnl.link_up(index),
        ]), ["address of " + BRIDGE, BRIDGE + " up"])  # fmt: skip
    except OSError as e:
        raise NetworkUnavailable(f"cannot create the bridge {BRIDGE}: {e.strerror}") from None
    atomic_write(record, str(subnet))
    return subnet, True


def _remove_rules(subnet: str, thorough: bool = False) -> None:
    """The NAT rules as recorded when they were made, or (no record, or ``thorough``)
    whatever of ours can be found."""
    try:
        with open(NAT_RECORD) as f:
            commands = json.load(f)
    except (OSError, ValueError):
        commands = None
    if commands is None or not nat.undo(commands) or thorough:
        nat.remove(BRIDGE, subnet)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(NAT_RECORD)


def atomic_write(path: str, text: str) -> None:
    temporary = f"{path}.{os.getpid()}"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


def _free_subnet() -> ipaddress.IPv4Network:
    """The first of DEFAULT_SUBNETS that overlaps none of the host's IPv4 routes."""
    taken = []
    with open("/proc/net/route") as f:  # little-endian hex: destination, mask
        for line in f.readlines()[1:]:
            fields = line.split()
            dst, mask = (ipaddress.IPv4Address(int(x, 16).to_bytes(4, "little")) for x in (fields[1], fields[7]))
            if int(mask):
                taken.append(ipaddress.IPv4Network(f"{dst}/{mask}", strict=False))
    for candidate in DEFAULT_SUBNETS:
        net = ipaddress.IPv4Network(candidate)
        if not any(net.overlaps(t) for t in taken):
            return net
    raise NetworkUnavailable(
        "every default range for the bridge overlaps a route of this host",
        hint="set network.subnet in config.toml",
    )


def _enable_forwarding(bridge: str) -> None:
    """Forwarding for packets from the bridge; where the host does not forward already,
    also on the interfaces of its default routes, which receive the replies."""
    names = [bridge]
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        if f.read().strip() == "0":
            with open("/proc/net/route") as routes:
                names += [line.split()[0] for line in routes.readlines()[1:]
                          if line.split()[1] == "00000000" and line.split()[7] == "00000000"]  # fmt: skip
    for name in names:
        with open(f"/proc/sys/net/ipv4/conf/{name}/forwarding", "w") as f:
            f.write("1")


def _dead(owner: int) -> bool:
    return not os.path.exists(f"/proc/{owner}")


def sweep_veths(sock: socket.socket, doomed: Callable[[int], bool], group: int = GROUP_FIRST - 1,
                also: tuple[int, ...] = ()) -> None:
    """Delete the veths whose owner pid (in their name) is ``doomed``, and the devices
    ``also`` (indexes): moved into ``group``, then the group deleted, in one request."""
    from dockbuild.engine.network import rtnl

    indexes = list(also)
    for name in os.listdir("/sys/class/net"):
        if not name.startswith(VETH_PREFIX):
            continue
        with contextlib.suppress(ValueError):
            if doomed(int(name[len(VETH_PREFIX) :].split(".")[0], 16)):
                index = rtnl.link_index(name)
                if index is not None:
                    indexes.append(index)
    if indexes:  # one gone meanwhile (its namespace ended) is fine
        rtnl.request(sock, [*(rtnl.set_group(i, group) for i in indexes), rtnl.delete_group(group)])


def teardown(group: int | None = None, users_fd: int | None = None, rules_anyway: bool = False) -> bool:
    """A build's end (``group``: its veths' group, ``users_fd``: its hold on the bridge):
    if it was the last build using the bridge, remove the bridge, every veth and the NAT
    rules (the rules side by side with the kernel's work), else only its veths. Whether
    it was the last. ``rules_anyway``: look for rules also when there is no bridge
    (prune --all)."""
    from dockbuild.engine.network import rtnl

    group = GROUP_FIRST - 1 if group is None else group
    setup = _lock("network.lock", fcntl.LOCK_EX)
    try:
        if users_fd is not None:
            os.close(users_fd)  # under the setup lock: no build joins meanwhile
        users = os.open(os.path.join(STATE_DIR, "network.users"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                last = False
            else:
                last = True
                index = rtnl.link_index(BRIDGE)
                failed: list[BaseException] = []
                undoing = None
                if index is not None or rules_anyway:
                    try:
                        with open(SUBNET_RECORD) as f:
                            subnet = f.read().strip()
                    except OSError:
                        subnet = DEFAULT_SUBNETS[0]

                    def undo() -> None:
                        try:
                            _remove_rules(subnet, rules_anyway)
                        except BaseException as e:
                            failed.append(e)

                    undoing = threading.Thread(target=undo, name="dockbuild-nat-undo")
                    undoing.start()
                with rtnl.open_socket() as sock:
                    # No build runs: every veth left is a dead build's, or this one's.
                    sweep_veths(sock, lambda _owner: True, group, () if index is None else (index,))
                if undoing is not None:
                    undoing.join()
                if failed:
                    raise failed[0]
        finally:
            os.close(users)
    finally:
        os.close(setup)
    if not last and users_fd is not None:  # the others' bridge stays: only this build's veths go
        with rtnl.open_socket() as sock:
            rtnl.request(sock, [rtnl.delete_group(group)])
    return last
