"""Errors a user can act on: the CLI prints them as one line, without a traceback; and the one
formatter that turns a pydantic validation error into such a line."""

from __future__ import annotations

from pydantic import ValidationError


class VptlabError(Exception):
    """Base class for every error vptlab reports to the user."""


class ConfigError(VptlabError):
    """A config value, key or override is wrong; the message names the dotted key."""


class DataError(VptlabError):
    """A dataset is missing or malformed; the message names what was expected where."""


class RegistryError(ConfigError):
    """An unknown name was asked of a registry."""


class FolderLocked(VptlabError):
    """Another vptlab command holds the folder's lock; the message names its pid and host."""


class TrainingDiverged(VptlabError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def format_validation_error(err: ValidationError, at: str = "") -> str:
    """One line for any pydantic error: the dotted key path (under `at`), what is wrong, the value.

    Shared by the experiment config, the study config and the factory options, so every config
    error reads the same."""
    first = err.errors()[0]
    key = ".".join([*([at] if at else []), *(str(part) for part in first["loc"])]) or "config"
    kind = first["type"]
    msg = first["msg"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    value = first.get("input")
    # An unknown key's or a missing key's "input" is its whole parent section: not worth echoing.
    hide_value = kind in ("extra_forbidden", "missing") or isinstance(value, dict)
    got = "" if hide_value else f", got {value!r}"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{key}: {msg}{got}{extra}"
