"""The project's own error types: a user's mistake is one of these and is shown as one line, no traceback
(`--debug` shows it); anything else is a bug or a library failure and keeps its traceback."""


class TunesmithError(Exception):
    """A mistake the user can fix (recipe, command line, data, run folder, model path)."""
