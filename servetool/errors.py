"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class ServetoolError(Exception):
    """An expected failure with a message meant for the user (no traceback)."""
