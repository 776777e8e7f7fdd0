"""Masquerading for the bridge: dockbuild's own nftables table, or iptables rules.

Both are made when the first build needs them and removed with the bridge by the last
(or by ``dockbuild prune --all``). Where iptables' FORWARD chain drops by default
(dockerd sets that), forwarded packets are accepted there too: a drop in any base chain
of the hook would win over an accept in ours.
"""

from __future__ import annotations

import shutil
import subprocess

TABLE = "dockbuild"
COMMENT = "dockbuild"


def backend() -> tuple[str | None, str]:
    """"nftables" or "iptables" (or None), and why."""
    if shutil.which("nft"):
        return "nftables", f"nft is installed: masquerading in table ip {TABLE}"
    if shutil.which("iptables"):
        return "iptables", "nft is not installed: masquerading with iptables rules"
    return None, "neither nft nor iptables is installed: no NAT, steps use the host's network"


def _run(args: list[str], stdin: str | None = None, check: bool = True) -> bool:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        from dockbuild.engine.network import NetworkUnavailable

        raise NetworkUnavailable(f"{args[0]} failed: {done.stderr.strip() or done.returncode}")
    return done.returncode == 0


def _forward_drops() -> bool:
    """Whether iptables' filter FORWARD chain drops by default."""
    if not shutil.which("iptables"):
        return False
    done = subprocess.run(["iptables", "-w", "-S", "FORWARD"], capture_output=True, text=True, check=False)
    return "-P FORWARD DROP" in done.stdout


def _forward_rules(bridge: str) -> list[list[str]]:
    return [
        ["FORWARD", "-i", bridge, "-m", "comment", "--comment", COMMENT, "-j", "ACCEPT"],
        ["FORWARD", "-o", bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
         "-m", "comment", "--comment", COMMENT, "-j", "ACCEPT"],
    ]  # fmt: skip


def _nat_rule(bridge: str, subnet: str) -> list[str]:
    return ["POSTROUTING", "-s", subnet, "!", "-o", bridge, "-m", "comment", "--comment", COMMENT, "-j", "MASQUERADE"]


def install(bridge: str, subnet: str) -> list[list[str]]:
    """Masquerade ``subnet`` leaving by any interface but ``bridge``; the commands that
    undo it (for :func:`undo`)."""
    kind, why = backend()
    if kind is None:
        from dockbuild.engine.network import NetworkUnavailable

        raise NetworkUnavailable(why)
    undo_commands: list[list[str]] = []
    if kind == "nftables":
        _run(["nft", "-f", "-"], (
            f"table ip {TABLE} {{\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f"    ip saddr {subnet} oifname != \"{bridge}\" masquerade\n"
            "  }\n"
            "  chain forward {\n"
            "    type filter hook forward priority filter; policy accept;\n"
            f"    iifname \"{bridge}\" accept\n"
            f"    oifname \"{bridge}\" ct state related,established accept\n"
            f"    oifname \"{bridge}\" drop\n"
            "  }\n"
            "}\n"
        ))  # fmt: skip
        undo_commands.append(["nft", "delete", "table", "ip", TABLE])
    else:
        _run(["iptables", "-w", "-t", "nat", "-A", *_nat_rule(bridge, subnet)])
        undo_commands.append(["iptables", "-w", "-t", "nat", "-D", *_nat_rule(bridge, subnet)])
    if _forward_drops():
        for rule in _forward_rules(bridge):
            _run(["iptables", "-w", "-I", *rule])
            undo_commands.append(["iptables", "-w", "-D", *rule])
    return undo_commands


def undo(commands: list[list[str]]) -> None:
    """Run what :func:`install` said undoes it (what is gone already is fine)."""
    for command in commands:
        _run(command, check=False)


def remove(bridge: str, subnet: str) -> None:
    """Remove dockbuild's table and every rule of ours, whatever exists of them (for a
    bridge whose record of its rules is lost, and prune --all)."""
    if shutil.which("nft"):
        _run(["nft", "delete", "table", "ip", TABLE], check=False)
    if shutil.which("iptables"):
        while _run(["iptables", "-w", "-t", "nat", "-D", *_nat_rule(bridge, subnet)], check=False):
            pass
        for rule in _forward_rules(bridge):
            while _run(["iptables", "-w", "-D", *rule], check=False):
                pass
