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
