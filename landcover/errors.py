"""Errors a user can act on.

Each carries the offending file (or config key) in its message, so the first line a user reads
says what to fix and where, rather than a stack trace from deep inside rasterio or torch.
"""


class LandcoverError(Exception):
    """Base class of every error the framework raises on bad input."""


class SceneError(LandcoverError):
    """An image/label pair that cannot be used as it is (grid, bands, codes, unreadable file)."""


class ConfigError(LandcoverError):
    """A configuration value that is missing, mistyped or out of range."""


class RunPrunedError(Exception):
    """A run stopped on purpose before its end (a pruned sweep trial): not a failure."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`) treated like Ctrl-C: the run ends KILLED, staging is
    removed, the command exits with one line. A KeyboardInterrupt, so every handler of
    Ctrl-C handles it too."""


class DiskFullError(LandcoverError):
    """No space left where an output was being written (earlier files are intact)."""


class ConfigValueError(ConfigError, ValueError):
    """A bad setting found by the component that uses it (a ValueError to plain callers)."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what a
    one-line report of a failure says."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def last_line(message: str, limit: int = 500) -> str:
    """The line of a wrapped error that says what happened: the last non-empty line that is
    no traceback frame (tracebacks, Ray's and joblib's wrappers end with the exception)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    meaningful = [line for line in lines if not line.startswith(("File ", "Traceback", "^"))]
    return (meaningful[-1] if meaningful else "")[:limit]


ACCESS_CODES = ("PERMISSION_DENIED", "UNAUTHENTICATED")


def access_refused(err: BaseException) -> str | None:
    """One line for a tracking server's 401/403 (an MLflow exception), else None.

    A member without a permission otherwise sees MLflow's traceback; the line says who was
    refused and how a colleague grants it (`landcover-team`, README "Team set-up")."""
    code = getattr(err, "error_code", None)
    if code not in ACCESS_CODES:
        return None
    import os

    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "an anonymous user"
    message = str(getattr(err, "message", err)).strip().splitlines()
    detail = message[0] if message else code
    if code == "UNAUTHENTICATED":
        return (
            f"the tracking server refused {user} ({detail}): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD to a member's credentials"
        )
    return (
        f"the tracking server refused {user} ({detail}): recording runs needs EDIT on the "
        "experiment, promoting needs EDIT on the registered model; one who MANAGEs it or an "
        f"admin grants it: landcover-team grant {user} --experiment NAME --permission EDIT "
        "(or --model NAME)"
    )
