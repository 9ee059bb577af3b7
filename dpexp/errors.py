"""Errors a user can fix from the command line: reported as one line, without a traceback."""


class UserError(Exception):
    """Bad input: the message names the key, the bad value and what is allowed."""


class ConfigError(UserError):
    """The composed configuration is invalid."""
