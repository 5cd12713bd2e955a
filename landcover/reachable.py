"""Is the tracking server there? Asked once, quickly, before a command depends on it.

MLflow's HTTP client retries a refused connection with growing back-off (seven tries by
default), so a command started while the team server is down says so only after four minutes
("INTERNAL_ERROR", or a traceback). One plain request with a short time-out first, and the
command says in seconds which server does not answer.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

from landcover.errors import LandcoverError

TIMEOUT_SECONDS = 5.0


class TrackingServerDownError(LandcoverError):
    """The tracking server named by a command does not answer."""


def is_server_uri(uri: str | None) -> bool:
    """A tracking URI served over HTTP (a SQLite or file store needs no server)."""
    return bool(uri) and str(uri).lower().startswith(("http://", "https://"))


def check_tracking_server(uri: str | None, timeout: float = TIMEOUT_SECONDS) -> None:
    """Raise TrackingServerDownError unless the server at `uri` answers at all (any HTTP status
    counts: a 401 is a server that is up). Stores that are not servers pass unasked."""
    if not is_server_uri(uri):
        return
    assert uri is not None
    parts = urllib.parse.urlsplit(uri)
    if not parts.hostname:
        raise TrackingServerDownError(f"tracking URI {uri!r} names no host")
    probe = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/health", "", ""))
    try:
        with urllib.request.urlopen(probe, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered
    except (OSError, ValueError) as err:  # refused, unreachable, timed out, a bad URL
        reason = getattr(err, "reason", err)
        raise TrackingServerDownError(
            f"the tracking server {uri} does not answer ({reason}): start it, or name another "
            "with --tracking-uri / MLFLOW_TRACKING_URI"
        ) from None
