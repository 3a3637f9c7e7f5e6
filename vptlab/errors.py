"""Errors a user can act on: the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class VptlabError(Exception):
    """Base class for every error vptlab reports to the user."""


class ConfigError(VptlabError):
    """A config value, key or override is wrong; the message names the dotted key."""


class DataError(VptlabError):
    """A dataset is missing or malformed; the message names what was expected where."""


class RegistryError(ConfigError):
    """An unknown name was asked of a registry."""


class TrainingDiverged(VptlabError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
