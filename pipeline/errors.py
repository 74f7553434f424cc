"""The one exception family the CLI turns into a clear message instead of a traceback."""


class UserError(ValueError):
    """A problem the user can fix: the message names the place (file, line, key) and what to do."""
