"""The one error type users see: a single line naming the file, row or field, and the fix."""


class KdError(Exception):
    """Raised for bad input or state; the CLI prints it as one line and exits with status 2."""
