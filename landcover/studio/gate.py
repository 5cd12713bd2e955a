"""What a request must show before the studio acts on it: its own page, not another site's.

A server on loopback is reachable by every page the person's browser opens: a page on another
site may POST to it (a "simple" cross-site request needs no permission), and a name that
resolves to 127.0.0.1 (DNS rebinding) lets another site read it. So, as Jupyter does, the
studio trusts only requests that carry this session's token (the URL it prints holds it; the
page then keeps it in a same-site cookie), that name a host it serves under, and whose
state-changing requests come from its own origin as JSON. With `--allow-remote` members sign
in with their team server's credentials instead of the token (`access.TeamCredentials`); the
origin and JSON rules hold there too.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from landcover.studio.access import is_loopback

COOKIE = "landcover-studio-{port}"
HEADER = "x-landcover-token"
INFO_FILE = ".studio.json"
MAX_BODY = 2 * 1024 * 1024  # bytes: a 10,000-point stroke is about 400 KB of JSON
SAFE_METHODS = ("GET", "HEAD")
OPEN_PATHS = ("/health", "/favicon.ico")  # say nothing about the scene


@dataclass(frozen=True)
class Gate:
    """The rules of one running studio: its token, the hosts it serves under, its port."""

    host: str
    port: int
    team: bool
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def cookie(self) -> str:
        """The cookie's name: one per port (cookies are shared by every port of a host)."""
        return COOKIE.format(port=self.port)

    def url(self) -> str:
        """The address to open: with the token on loopback, plain for a team studio."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        base = f"http://{host}:{self.port}/"
        return base if self.team else f"{base}?token={self.token}"

    def host_refusal(self, host_header: str | None) -> str | None:
        """Why a `Host` header is refused (DNS rebinding), or None. A team studio answers
        under whatever name the team uses: every request there is signed in."""
        if self.team:
            return None
        name, port = split_host(host_header or "")
        if port != self.port or not (is_loopback(name) or name == self.host):
            return f"this studio answers as {self.host}:{self.port} only, not as {host_header!r}"
        return None

    def origin_refusal(self, method: str, headers: dict[str, str]) -> str | None:
        """Why a state-changing request is refused as coming from another site, or None.
        Browsers send `Origin` with every cross-origin POST; a tool such as curl sends none
        and is judged by its token alone."""
        if method in SAFE_METHODS:
            return None
        if headers.get("sec-fetch-site") == "cross-site":
            return "a request from another site is refused"
        origin = headers.get("origin")
        if origin is None:
            return None
        scheme, _, netloc = origin.partition("://")
        if self.team:  # behind a TLS proxy too: the page's origin is the host it asked
            same = scheme in ("http", "https") and netloc == headers.get("host")
        else:
            name, port = split_host(netloc)
            same = (
                scheme == "http" and port == self.port and (is_loopback(name) or name == self.host)
            )
        return None if same else f"a request from {origin!r} is refused"

    def body_refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str] | None:
        """(status, reason) for a body the API will not read, or None: JSON only (a
        cross-site form or text/plain POST is then impossible without the browser asking
        first), and at most MAX_BODY bytes."""
        if method in SAFE_METHODS:
            return None
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return 415, "the studio's API takes JSON only (Content-Type: application/json)"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return 413, f"a request body is at most {MAX_BODY // 1024} KiB"
        return None

    def token_matches(self, headers: dict[str, str], cookies: dict[str, str]) -> bool:
        """The session token, from the page's cookie or a tool's header."""
        offered = headers.get(HEADER) or cookies.get(self.cookie) or ""
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def offered_in_query(self, query_token: str | None) -> bool:
        """The token of the URL the studio printed (the first visit)."""
        return query_token is not None and hmac.compare_digest(
            query_token.encode(), self.token.encode()
        )

    def write_info(self, folder: Path) -> Path:
        """`<session>/.studio.json` (owner-only): how a tool or a test on this machine finds
        the running studio's address and token, as Jupyter's runtime files do."""
        path = folder / INFO_FILE
        temporary = path.with_name(f"{INFO_FILE}.{os.getpid()}.tmp")
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600
        )
        with os.fdopen(descriptor, "w") as out:
            json.dump({"url": self.url(), "token": self.token, "pid": os.getpid()}, out)
        os.replace(temporary, path)
        return path


def split_host(value: str) -> tuple[str, int | None]:
    """`name:port` (or `[v6]:port`) -> (name, port); port None when absent or not a number."""
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        name, _, port_text = value.rpartition(":")
        if not name:
            name, port_text = value, ""
    try:
        return name.lower(), int(port_text) if port_text else None
    except ValueError:
        return name.lower(), None
