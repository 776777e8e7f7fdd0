"""Batched rtnetlink requests, encoded with pyroute2's message classes.

A step's namespace needs five changes (``lo`` up, the veth pair, an address, a route, the
bridge port); pyroute2's ``IPRoute`` spends milliseconds of Python on each call, so they
are encoded here and sent over a plain netlink socket, several to a datagram (the kernel
handles them in order), each acknowledged.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from typing import Any


def _load_message_classes() -> None:
    """Let the message classes be imported without pyroute2's package ``__init__``,
    which loads every API it has (IPRoute, NDB, IPDB, asyncio, ...): about half a second,
    against a tenth for the classes. A bare package module with the right ``__path__``
    stands in for it while they are imported (see below), unless pyroute2 is loaded."""
    import importlib.util
    import types

    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("pyroute2 is not installed")
    package = types.ModuleType("pyroute2")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["pyroute2"] = package


_load_message_classes()

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NLMSG_ERROR  # noqa: E402
from pyroute2.netlink.rtnl import RTM_DELLINK, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE  # noqa: E402
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # noqa: E402
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # noqa: E402
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # noqa: E402

# A later ``import pyroute2`` runs the real __init__ (the submodules stay loaded).
if not hasattr(sys.modules["pyroute2"], "IPRoute"):
    del sys.modules["pyroute2"]

IFF_UP = 1
CREATE = NLM_F_CREATE | NLM_F_EXCL


def open_socket() -> socket.socket:
    """A route netlink socket in the calling thread's network namespace."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    sock.bind((0, 0))
    return sock


def request(sock: socket.socket, messages: list[tuple[Any, int, int]]) -> list[tuple[int, int]]:
    """Send (message, type, flags) in one datagram; the (position, errno) of failures."""
    data = []
    for seq, (msg, kind, flags) in enumerate(messages, 1):
        msg["header"]["type"] = kind
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
        msg["header"]["sequence_number"] = seq
        msg.encode()
        data.append(msg.data)
    sock.send(b"".join(data))
    failed = []
    pending = len(messages)
    while pending:
        chunk = sock.recv(65536)
        offset = 0
        while offset + 16 <= len(chunk):
            length, kind, _flags, seq, _pid = struct.unpack_from("=LHHLL", chunk, offset)
            if kind == NLMSG_ERROR:
                code = struct.unpack_from("=i", chunk, offset + 16)[0]
                if code:
                    failed.append((seq - 1, -code))
                pending -= 1
            offset += (length + 3) & ~3
    return failed


def check(failed: list[tuple[int, int]], what: list[str]) -> None:
    if failed:
        position, code = failed[0]
        raise OSError(code, f"{what[position]}: {os.strerror(code)}")


def link_up(index: int, master: int | None = None) -> tuple[Any, int, int]:
    msg = ifinfmsg()
    msg["index"] = index
    msg["flags"] = msg["change"] = IFF_UP
    if master is not None:
        msg["attrs"] = [("IFLA_MASTER", master)]
    return msg, RTM_NEWLINK, 0


def veth(
    index: int, name: str, peer_index: int, peer_name: str, peer_netns_fd: int, peer_group: int
) -> tuple[Any, int, int]:
    """A veth pair, up, this end ``name`` at ``index``; the peer in another namespace,
    in the device group ``peer_group``."""
    peer = {"index": peer_index, "attrs": [
        ("IFLA_IFNAME", peer_name), ("IFLA_NET_NS_FD", peer_netns_fd), ("IFLA_GROUP", peer_group),
    ]}  # fmt: skip
    msg = ifinfmsg()
    msg["index"] = index
    msg["flags"] = msg["change"] = IFF_UP
    msg["attrs"] = [
        ("IFLA_IFNAME", name),
        ("IFLA_LINKINFO", {"attrs": [
            ("IFLA_INFO_KIND", "veth"),
            ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer)]}),
        ]}),
    ]  # fmt: skip
    return msg, RTM_NEWLINK, CREATE


def address(index: int, ip: str, prefixlen: int) -> tuple[Any, int, int]:
    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET
    msg["prefixlen"] = prefixlen
    msg["index"] = index
    msg["attrs"] = [("IFA_LOCAL", ip), ("IFA_ADDRESS", ip)]
    return msg, RTM_NEWADDR, CREATE


def default_route(index: int, gateway: str) -> tuple[Any, int, int]:
    msg = rtmsg()
    msg["family"] = socket.AF_INET
    msg["table"] = 254  # main
    msg["proto"] = 4  # static
    msg["scope"] = 0  # universe
    msg["type"] = 1  # unicast
    msg["attrs"] = [("RTA_GATEWAY", gateway), ("RTA_OIF", index)]
    return msg, RTM_NEWROUTE, CREATE


def bridge(name: str) -> tuple[Any, int, int]:
    msg = ifinfmsg()
    msg["attrs"] = [("IFLA_IFNAME", name), ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "bridge")]})]
    return msg, RTM_NEWLINK, CREATE


def delete_link(index: int) -> tuple[Any, int, int]:
    msg = ifinfmsg()
    msg["index"] = index
    return msg, RTM_DELLINK, 0


def set_group(index: int, group: int) -> tuple[Any, int, int]:
    msg = ifinfmsg()
    msg["index"] = index
    msg["attrs"] = [("IFLA_GROUP", group)]
    return msg, RTM_NEWLINK, 0


def delete_group(group: int) -> tuple[Any, int, int]:
    """Every device of the group, in one go: the kernel waits once for the whole batch
    to be unregistered (some 20-40 ms), where a request per device waits each time."""
    msg = ifinfmsg()
    msg["attrs"] = [("IFLA_GROUP", group)]
    return msg, RTM_DELLINK, 0


def link_index(name: str) -> int | None:
    """The interface's index in this process's (main thread's) namespace, or None."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None
