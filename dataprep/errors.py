"""Error text for one-line messages: the CLI, the loader and ``train_minimal`` quote the first line
of what went wrong (a library's error can run to a whole traceback)."""
from __future__ import annotations


def first_line(err: BaseException) -> str:
    """An exception's first message line (its type's name when it has no message)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
