"""The one exception type a user sees as a one-line message instead of a traceback."""


class TbpwError(Exception):
    """A problem the user can fix: the message names the cause and the fix, on one line."""

    def __init__(self, message: str, *, details: str | None = None):
        super().__init__(message)
        self.details = details  # extra lines (a log tail) shown after the message
