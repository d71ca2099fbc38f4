"""User-facing errors: each is one line that names the file and line, or the config key, at fault.
The CLI prints them without a traceback (unless --debug) and exits with status 2."""

from __future__ import annotations


class ARRError(ValueError):
    """A bad input the user can fix."""


class ConfigError(ARRError):
    """A bad configuration value; the message names the key."""


class DataError(ARRError):
    """A bad data file; the message names the file and, where there is one, the line."""

    def __init__(self, path, message: str, line: int | str | None = None):
        where = {int: f"{path}:{line}", str: f"{path} {line}"}.get(type(line), str(path))
        super().__init__(f"{where}: {message}")
