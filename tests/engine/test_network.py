"""RUN networks' pure parts: resolv.conf as docker writes it, config.toml's [network]."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockbuild.engine.network import Settings, settings, step_resolv_conf
from dockbuild.errors import DockbuildError

RESOLVED_STUB = "# systemd-resolved\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.example\n"
RESOLVED_UPSTREAM = "nameserver 192.0.2.53\nnameserver 2001:db8::53\nsearch corp.example\n"


def test_a_host_resolv_conf_without_loopback_servers_is_kept_as_it_is() -> None:
    host = "nameserver 192.0.2.1\nsearch example.org\n"
    assert step_resolv_conf(host, "", None) == host


def test_systemd_resolveds_stub_is_replaced_by_its_upstream_servers() -> None:
    got = step_resolv_conf(RESOLVED_STUB, RESOLVED_UPSTREAM, None)
    assert "127.0.0.53" not in got
    assert "nameserver 192.0.2.53\nnameserver 2001:db8::53\n" in got
    assert "options edns0 trust-ad" in got and "search corp.example" in got


def test_slirps_resolver_replaces_loopback_servers_rootless() -> None:
    got = step_resolv_conf(RESOLVED_STUB, RESOLVED_UPSTREAM, ("10.0.2.3",))
    assert [line for line in got.splitlines() if line.startswith("nameserver")] == ["nameserver 10.0.2.3"]


def test_only_loopback_servers_and_nothing_upstream_give_dockers_fallback() -> None:
    got = step_resolv_conf("nameserver 127.0.0.1\nnameserver ::1\n", "", None)
    assert got == "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"


def test_loopback_servers_beside_others_are_just_dropped() -> None:
    got = step_resolv_conf("nameserver 127.0.0.53\nnameserver 192.0.2.1\n", RESOLVED_UPSTREAM, None)
    assert got == "nameserver 192.0.2.1\n"


def test_config_network_keys() -> None:
    assert settings({}) == Settings("isolated", None)
    assert settings({"network": {"default": "host", "subnet": "10.123.0.0/16"}}) == Settings("host", "10.123.0.0/16")
    with pytest.raises(DockbuildError, match="network.default"):
        settings({"network": {"default": "bridge"}})
    with pytest.raises(DockbuildError, match="network.subnet"):
        settings({"network": {"subnet": "10.1.2.3/33"}})


def test_a_bad_network_value_is_a_warning_with_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dockbuild.engine.network import settings_or_defaults

    config = tmp_path / "config.toml"
    config.write_text('[network]\ndefault = "bridge"\n')
    monkeypatch.setenv("DOCKBUILD_CONFIG", str(config))
    got, warning = settings_or_defaults()
    assert got == Settings() and warning is not None and "network.default" in warning
    config.write_text("[network\n")  # not TOML: the build says so already, once
    assert settings_or_defaults() == (Settings(), None)


def test_pyroute2_stays_whole_for_its_other_users_after_the_message_classes_load() -> None:
    """rtnl loads pyroute2's message classes without the package's __init__ (which loads
    every API it has); an ``import pyroute2`` afterwards, in the same process, must still
    get the whole package."""
    import subprocess
    import sys

    code = (
        "from dockbuild.engine.network import rtnl\n"
        "msg, kind, flags = rtnl.address(2, '10.88.0.7', 16)\n"
        "msg.encode()\n"
        "import pyroute2\n"
        "print(len(msg.data), hasattr(pyroute2, 'IPRoute'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["40", "True"]  # header, ifaddrmsg, two addresses
