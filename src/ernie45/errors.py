"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback."""


class ErnieError(Exception):
    """A problem with the user's input (path, file, parameter) rather than a bug in ernie45."""
