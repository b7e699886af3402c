"""The one exception type the CLI turns into a one-line message and a non-zero exit, and
how a library's error is quoted inside one."""


class ServetoolError(Exception):
    """An expected failure with a message meant for the user (no traceback)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line, for quoting a library's long error inside our own message."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__


def whole_cause(exc: BaseException, limit: int = 600) -> str:
    """A library's multi-line error as one line: every line that says something, the root cause
    first (a wrapper's advice after it), instead of the wrapper's first line alone."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        parts.append(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
        exc = exc.__cause__ or exc.__context__
    line = " -- raised as: ".join(reversed(parts))
    return line if len(line) <= limit else line[:limit] + "..."
