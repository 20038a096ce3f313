"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UsageError(Exception):
    """Bad config, bad input file, impossible combination: the user can fix it."""
