"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad params, data or paths: the message names the key, file or line at fault."""
