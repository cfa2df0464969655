"""Errors a user can cause. The CLI prints them as one ``error:`` line and exits with code 2."""

from __future__ import annotations


class UsageError(Exception):
    """A mistake in the user's input (config, data, plugin names, paths) that they can fix.

    The message is one line that names the culprit and, where possible, how to fix it.
    """


class ConfigError(UsageError):
    """One or more invalid configuration values, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid config: " + "; ".join(self.problems))


class PluginError(UsageError):
    """A plugin that cannot be found, imported, registered or combined with the others."""
