"""The exception types the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad params, data or paths: the message names the key, file or line at fault."""


class StageFailed(UserError):
    """A step's process (a DVC stage, a study's run, a push) failed; the message is its one-line error."""
