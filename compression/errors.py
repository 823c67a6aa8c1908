"""The one exception type a user sees: a one-line message naming the bad input and what was expected."""


class UserError(Exception):
    """Bad input from the user (a path, a file, a value); the CLI prints it on one line and exits 2."""
