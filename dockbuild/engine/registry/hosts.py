"""Registry mirrors and insecure registries from ``~/.config/dockbuild/config.toml``,
in buildkitd.toml's spelling::

    [registry."docker.io"]
    mirrors = ["mirror.gcr.io", "127.0.0.1:5000"]

    [registry."registry.internal:5000"]
    http = true        # plain HTTP
    insecure = true    # HTTPS without certificate verification

Pulls try each mirror of a registry in order, then the registry itself; whatever comes
back is verified against the digests as always, so a bad mirror can only fail over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dockbuild.engine.registry.reference import Reference
from dockbuild.errors import DockbuildError


@dataclass(frozen=True)
class RegistryHosts:
    mirrors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    insecure: frozenset[str] = frozenset()

    def candidates(self, ref: Reference) -> list[Reference]:
        """Where to pull ``ref`` from, in order: its mirrors, then its own registry."""
        out = [
            Reference(domain=mirror, path=ref.path, tag=ref.tag, digest=ref.digest)
            for mirror in self.mirrors.get(ref.domain, ())
        ]
        return [*out, ref]


def load_hosts() -> RegistryHosts:
    from dockbuild import config

    section = config.load().get("registry") or {}
    if not isinstance(section, dict):
        raise DockbuildError("config: [registry] must be a table of registry hosts")
    mirrors: dict[str, tuple[str, ...]] = {}
    insecure: set[str] = set()
    for host, opts in section.items():
        if not isinstance(opts, dict):
            raise DockbuildError(f'config: [registry."{host}"] must be a table')
        domain = "docker.io" if host in ("index.docker.io", "registry-1.docker.io") else host
        listed = opts.get("mirrors", [])
        if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
            raise DockbuildError(f'config: [registry."{host}"] mirrors must be a list of hosts')
        if listed:
            mirrors[domain] = tuple(m.removeprefix("https://").removeprefix("http://").rstrip("/") for m in listed)
        if opts.get("http") or opts.get("insecure"):
            insecure.add(domain)
    return RegistryHosts(mirrors, frozenset(insecure))
