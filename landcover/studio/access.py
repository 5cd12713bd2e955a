"""Who may open the page: this machine only, unless asked; then the team server's members.

By default the studio listens on loopback and trusts whoever reaches it (the person at this
machine, the author of every edit). `--allow-remote` opens it to a network, and then every
request must carry HTTP basic credentials that the team's MLflow server (`mlflow server
--app-name basic-auth`) accepts: the studio asks that server, keeps a positive answer for a few
minutes (a salted hash of the password, never the password), and records the member as the
author of their edits.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import threading
import time
import urllib.error
import urllib.request

from landcover.errors import LandcoverError

REMEMBER_SECONDS = 300
FORGET_REFUSAL_SECONDS = 5  # a wrong password asked again within this is refused unasked
CHECK_TIMEOUT_SECONDS = 5
CHECK_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"


class AccessError(LandcoverError):
    """The studio will not listen where it was asked to."""


class TeamServerDownError(LandcoverError):
    """The team server did not answer: nobody can be signed in until it does (HTTP 503)."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool, tracking_uri: str) -> None:
    """Refuse a non-loopback address unless asked, and then only with a team server to ask
    for credentials."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise AccessError(
            f"--host {host} would let other machines edit this scene; the studio listens on "
            "loopback unless --allow-remote is given (then members sign in with their team "
            "server credentials)"
        )
    if not tracking_uri.startswith(("http://", "https://")):
        raise AccessError(
            f"--allow-remote needs the team's MLflow server to check members' credentials; "
            f"the tracking URI is {tracking_uri!r} (set --tracking-uri http://host:5000)"
        )


class TeamCredentials:
    """Checks basic-auth credentials against the team server, remembering positive answers."""

    def __init__(self, server: str) -> None:
        self.server = server.rstrip("/")
        self._salt = os.urandom(16)
        self._known: dict[str, float] = {}
        self._refused: dict[str, float] = {}
        self._lock = threading.Lock()

    def member(self, authorization: str | None) -> str | None:
        """The member's user name if the `Authorization` header is accepted, else None."""
        if not authorization or not authorization.startswith("Basic "):
            return None
        try:
            user, _, _password = base64.b64decode(authorization[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        key = hashlib.sha256(self._salt + authorization.encode()).hexdigest()
        with self._lock:
            if self._known.get(key, 0) > time.monotonic():
                return user
            if self._refused.get(key, 0) > time.monotonic():
                return None
        if not self._server_accepts(authorization):
            with self._lock:
                self._refused[key] = time.monotonic() + FORGET_REFUSAL_SECONDS
            return None
        with self._lock:
            self._known[key] = time.monotonic() + REMEMBER_SECONDS
        return user

    def _server_accepts(self, authorization: str) -> bool:
        """Called from a worker thread (never the event loop: a slow check must not hold
        other members' requests); a server that does not answer is TeamServerDownError."""
        request = urllib.request.Request(
            self.server + CHECK_PATH, headers={"Authorization": authorization}
        )
        try:
            with urllib.request.urlopen(request, timeout=CHECK_TIMEOUT_SECONDS) as answer:
                return answer.status == 200
        except urllib.error.HTTPError as err:
            if err.code >= 500:
                raise TeamServerDownError(
                    f"the team server {self.server} cannot check sign-ins (HTTP {err.code})"
                ) from None
            return False
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise TeamServerDownError(
                f"the team server {self.server} does not answer ({reason}): sign-in is "
                "impossible until it does"
            ) from None
