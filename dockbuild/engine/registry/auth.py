"""Registry credentials (docker's config.json and credential helpers) and auth challenges."""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dockbuild.errors import RegistryError

if TYPE_CHECKING:
    import requests

# Docker Hub credentials live under the v1 index URL, for historical reasons.
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
# A credential helper answering with this user name returns an OAuth2 refresh token.
_IDENTITY_TOKEN_USER = "<token>"
_HELPER_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    """A user name and secret for one registry, or an identity (refresh) token."""

    username: str = ""
    password: str = ""
    identity_token: str = ""

    def __repr__(self) -> str:  # never print secrets in tracebacks or logs
        return f"Credentials(username={self.username!r}, password=***)"


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: a scheme (lower case) and its parameters."""

    scheme: str
    params: Mapping[str, str]


def docker_config_dir() -> Path:
    """$DOCKER_CONFIG, else ~/.docker (as the docker CLI)."""
    configured = os.environ.get("DOCKER_CONFIG")
    return Path(configured) if configured else Path.home() / ".docker"


def load_docker_config(config_dir: Path | None = None) -> dict[str, Any]:
    """The parsed config.json, or {} when there is none."""
    path = (config_dir or docker_config_dir()) / "config.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise RegistryError(f"cannot read {path}: {e.strerror}") from e
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise RegistryError(f"{path} is not a JSON object")
    return config


def _config_key_host(key: str) -> str:
    """`https://localhost:5000/v2/` -> `localhost:5000`: config keys may be URLs."""
    host = key.split("://", 1)[-1]
    return host.split("/", 1)[0]


def _is_docker_hub(domain: str) -> bool:
    return domain in _DOCKER_HUB_ALIASES


def _auths_entry(auths: Mapping[str, Any], domain: str) -> Credentials | None:
    for key, entry in auths.items():
        host = _config_key_host(key)
        matches = _is_docker_hub(host) if _is_docker_hub(domain) else host == domain
        if not matches or not isinstance(entry, dict):
            continue
        if entry.get("identitytoken"):
            return Credentials(identity_token=entry["identitytoken"])
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as e:
                raise RegistryError(
                    f"the auth entry for {key!r} in {docker_config_dir() / 'config.json'} "
                    "is not base64 of user:password"
                ) from e
            username, _, password = decoded.partition(":")
            return Credentials(username, password)
        if entry.get("username"):
            return Credentials(entry["username"], entry.get("password", ""))
    return None


def _from_helper(helper: str, domain: str) -> Credentials | None:
    """Ask `docker-credential-<helper> get`; None when it has nothing for this registry.

    A helper that is not installed counts as "nothing": a config.json copied from a
    desktop machine (credsStore=desktop) must not break anonymous pulls.
    """
    program = shutil.which(f"docker-credential-{helper}")
    if program is None:
        return None
    server = DOCKER_HUB_CONFIG_KEY if _is_docker_hub(domain) else domain
    try:
        done = subprocess.run(
            [program, "get"],
            input=server,
            capture_output=True,
            text=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RegistryError(f"credential helper docker-credential-{helper} failed: {e}") from e
    if done.returncode != 0:
        if "credentials not found" in (done.stdout + done.stderr).lower():
            return None
        raise RegistryError(
            f"credential helper docker-credential-{helper} failed for {domain}: "
            f"{(done.stderr or done.stdout).strip()}"
        )
    try:
        answer = json.loads(done.stdout)
        username, secret = answer.get("Username", ""), answer.get("Secret", "")
    except (json.JSONDecodeError, AttributeError) as e:
        raise RegistryError(f"credential helper docker-credential-{helper} answered garbage") from e
    if not secret:
        return None
    if username == _IDENTITY_TOKEN_USER:
        return Credentials(identity_token=secret)
    return Credentials(username, secret)


def lookup_credentials(domain: str, config_dir: Path | None = None) -> Credentials | None:
    """The credentials docker would use for `domain`, or None (anonymous).

    Order as in the docker CLI: a per-registry `credHelpers` entry, else the global
    `credsStore`, falling back to the inline `auths` entry.
    """
    config = load_docker_config(config_dir)
    helpers = config.get("credHelpers") or {}
    helper = next(
        (h for key, h in helpers.items() if _config_key_host(key) == domain), None
    ) or config.get("credsStore")
    if helper:
        found = _from_helper(helper, domain)
        if found is not None:
            return found
    return _auths_entry(config.get("auths") or {}, domain)


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse `WWW-Authenticate` (RFC 7235): `Bearer realm="...",scope="a:b:pull,push"`.

    Quoted values may contain commas and backslash escapes, so this is a small scanner
    rather than a split on commas.
    """
    challenges: list[Challenge] = []
    i, n = 0, len(header)
    scheme: str | None = None
    params: dict[str, str] = {}

    def skip(chars: str) -> None:
        nonlocal i
        while i < n and header[i] in chars:
            i += 1

    def token() -> str:
        nonlocal i
        start = i
        while i < n and header[i] not in ' \t,="':
            i += 1
        return header[start:i]

    while True:
        skip(" \t,")
        if i >= n:
            break
        word = token()
        skip(" \t")
        if i < n and header[i] == "=" and scheme is not None:
            i += 1
            skip(" \t")
            if i < n and header[i] == '"':
                i += 1
                value = []
                while i < n and header[i] != '"':
                    if header[i] == "\\" and i + 1 < n:
                        i += 1
                    value.append(header[i])
                    i += 1
                i += 1  # the closing quote
                params[word.lower()] = "".join(value)
            else:
                params[word.lower()] = token()
        elif word:
            # A bare word starts a new challenge (token68 forms are not used by registries).
            if scheme is not None:
                challenges.append(Challenge(scheme, params))
            scheme, params = word.lower(), {}
        else:
            i += 1  # a stray character: skip it rather than loop forever
    if scheme is not None:
        challenges.append(Challenge(scheme, params))
    return challenges


def basic_authorization(credentials: Credentials) -> str:
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class BearerToken:
    """A token from a registry's token service, with the time it stops being useful."""

    token: str
    expires_at: float


def fetch_bearer_token(
    session: requests.Session,
    challenge: Challenge,
    scopes: list[str],
    credentials: Credentials | None,
    *,
    timeout: float = 30.0,
) -> BearerToken:
    """Exchange credentials (or nothing, for anonymous pulls) for a bearer token.

    GET with basic auth is what Docker Hub, GHCR and distribution's token server
    expect; an identity token goes through the OAuth2 refresh-token POST instead.
    """
    realm = challenge.params.get("realm")
    if not realm:
        raise RegistryError("the registry's bearer challenge names no token realm")
    service = challenge.params.get("service", "")
    if not scopes and challenge.params.get("scope"):
        scopes = challenge.params["scope"].split(" ")
    try:
        if credentials is not None and credentials.identity_token:
            response = session.post(
                realm,
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": credentials.identity_token,
                    "service": service,
                    "scope": " ".join(scopes),
                    "client_id": "dockbuild",
                },
                timeout=timeout,
            )
        else:
            auth = (credentials.username, credentials.password) if credentials else None
            response = session.get(
                realm, params={"service": service, "scope": scopes}, auth=auth, timeout=timeout
            )
    except OSError as e:  # requests' exceptions derive from OSError (IOError)
        raise RegistryError(f"cannot reach the token service {realm}: {e}") from e
    if response.status_code in (401, 403):
        raise RegistryError(
            f"the token service {realm} refused the credentials ({response.status_code})",
            hint="log in with docker login or check ~/.docker/config.json",
        )
    if response.status_code != 200:
        raise RegistryError(f"the token service {realm} answered {response.status_code}")
    try:
        body = response.json()
    except ValueError as e:
        raise RegistryError(f"the token service {realm} answered something not JSON") from e
    token = body.get("token") or body.get("access_token")
    if not token:
        raise RegistryError(f"the token service {realm} answered no token")
    # Registries default to 60 s; renew a little early so a request never carries a dead one.
    expires_in = body.get("expires_in") or 60
    return BearerToken(token=token, expires_at=time.monotonic() + max(int(expires_in) - 10, 1))
