"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class ServetoolError(Exception):
    """An expected failure with a message meant for the user (no traceback)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line, for quoting a library's long error inside our own message."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__
