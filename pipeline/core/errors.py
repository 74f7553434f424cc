"""The one exception family the CLI turns into a clear message instead of a traceback."""


class UserError(ValueError):
    """A problem the user can fix: the message names the place (file, line, key) and what to do.

    `exit_code` is what the command exits with: 1 for problems in the data or the outside world,
    2 for usage errors (a bad option or params.yaml), as `tuneline validate` documents."""

    exit_code = 1
