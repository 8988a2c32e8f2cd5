"""The one user-facing error type.

Every bad user input raises :class:`NH2STError` with a one-line message that names the file or
field at fault and says what to do. The CLI prints the message and exits with status 1.
"""


class NH2STError(Exception):
    """A problem with the user's input or environment, explained in one line."""
