"""Errors caused by the user's input (config, data, paths): the CLI prints them as one line, exit 2."""


class UserError(ValueError):
    """Bad input. The message is one line that names the file/line or the config key."""
