"""Masquerading for the bridge: dockbuild's own nftables table, or iptables rules.

Both are made when the first build needs them and removed with the bridge by the last
(or by ``dockbuild prune --all``). Where iptables' FORWARD chain drops by default
(dockerd sets that), forwarded packets are accepted there too: a drop in any base chain
of the hook would win over an accept in ours. iptables rules are added and removed by one
``iptables-restore --noflush`` each time, and the commands run side by side: every one
of them costs milliseconds (iptables reads the whole ruleset first).
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

TABLE = "dockbuild"
COMMENT = "dockbuild"

# A command to run: its arguments and what it reads on stdin.
Command = tuple[list[str], str]


def backend() -> tuple[str | None, str]:
    """"nftables" or "iptables" (or None), and why."""
    if shutil.which("nft"):
        return "nftables", f"nft is installed: masquerading in table ip {TABLE}"
    if shutil.which("iptables"):
        return "iptables", "nft is not installed: masquerading with iptables rules"
    return None, "neither nft nor iptables is installed: no NAT, steps use the host's network"


def run_all(commands: list[Command]) -> list[tuple[int, str, str]]:
    """Run the commands side by side: each one's exit status, output and errors (127 for
    a program that cannot be started)."""
    started: list[tuple[subprocess.Popen[str] | OSError, str]] = []
    for args, stdin in commands:
        try:
            started.append((subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ), stdin))  # fmt: skip
        except OSError as e:
            started.append((e, stdin))
    done = []
    for process, stdin in started:
        if isinstance(process, OSError):
            done.append((127, "", str(process)))
            continue
        out, err = process.communicate(stdin)
        done.append((process.returncode, out, err))
    return done


def _tool(name: str) -> str:
    """The program's full path: a record of the commands that undo the NAT is run by the
    build that ends last, whose PATH may differ."""
    return shutil.which(name) or name


def _check(commands: list[Command], done: list[tuple[int, str, str]]) -> None:
    for (args, _), (status, _, err) in zip(commands, done, strict=True):
        if status != 0:
            from dockbuild.engine.network import NetworkUnavailable

            raise NetworkUnavailable(f"{args[0]} failed: {err.strip() or status}")


def _forward_rules(bridge: str) -> list[str]:
    return [
        f"FORWARD -i {bridge} -m comment --comment {COMMENT} -j ACCEPT",
        f"FORWARD -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment {COMMENT} -j ACCEPT",
    ]


def _nat_rule(bridge: str, subnet: str) -> str:
    return f"POSTROUTING -s {subnet} ! -o {bridge} -m comment --comment {COMMENT} -j MASQUERADE"


def _restore(how: str, nat: list[str], forward: list[str]) -> Command:
    """iptables-restore input that applies ``how`` (-A, -I, -D) to the rules."""
    lines = []
    for table, rules in (("nat", nat), ("filter", forward)):
        if rules:
            lines += [f"*{table}", *(f"{how} {rule}" for rule in rules), "COMMIT"]
    return [_tool("iptables-restore"), "-w", "--noflush"], "\n".join(lines) + "\n"


def install(bridge: str, subnet: str) -> list[Command]:
    """Masquerade ``subnet`` leaving by any interface but ``bridge``; the commands that
    undo it (for :func:`undo`)."""
    kind, why = backend()
    if kind is None:
        from dockbuild.engine.network import NetworkUnavailable

        raise NetworkUnavailable(why)
    table: list[Command] = []
    nat_rules: list[str] = []
    undo_commands: list[Command] = []
    if kind == "nftables":
        table.append(([_tool("nft"), "-f", "-"], (
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
        )))  # fmt: skip
        undo_commands.append(([_tool("nft"), "delete", "table", "ip", TABLE], ""))
    else:
        nat_rules.append(_nat_rule(bridge, subnet))
    # The table is made while iptables tells whether FORWARD drops.
    looking: list[Command] = [(["iptables", "-w", "-S", "FORWARD"], "")] if shutil.which("iptables") else []
    done = run_all([*table, *looking])
    _check(table, done[: len(table)])
    forward = _forward_rules(bridge) if looking and "-P FORWARD DROP" in done[-1][1] else []
    if nat_rules or forward:
        adding = [_restore("-I", nat_rules, forward)]
        _check(adding, run_all(adding))
        undo_commands.append(_restore("-D", nat_rules, forward))
    return undo_commands


def undo(commands: list[Any]) -> bool:
    """Run what :func:`install` said undoes it, side by side; whether all of it could
    be undone (a record of an older dockbuild holds argument lists only)."""
    todo: list[Command] = [(c, "") if isinstance(c[0], str) else (c[0], c[1]) for c in commands]
    return all(status == 0 for status, _, _ in run_all(todo))


def remove(bridge: str, subnet: str) -> None:
    """Remove dockbuild's table and every rule of ours, whatever exists of them (for a
    bridge whose record of its rules is lost, an undo that failed, and prune --all)."""
    if shutil.which("nft"):
        run_all([(["nft", "delete", "table", "ip", TABLE], "")])
    if shutil.which("iptables"):
        for table, rule in [("nat", _nat_rule(bridge, subnet)), *(("filter", r) for r in _forward_rules(bridge))]:
            while run_all([(["iptables", "-w", "-t", table, "-D", *rule.split()], "")])[0][0] == 0:
                pass
