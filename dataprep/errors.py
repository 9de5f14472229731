"""Error text for one-line messages: the CLI, the loader and ``train_minimal`` quote the first line
of what went wrong (a library's error can run to a whole traceback)."""
from __future__ import annotations

import sys
import traceback

#: Exit status of a command stopped by an error (README, "Exit status"): as argparse's usage errors.
#: 1 is kept for "done, and problems found" (``verify``, ``build --strict``), so a crash must not give it.
NOT_DONE = 2

#: Exit status of a command stopped by Ctrl-C or SIGTERM: 128 + SIGINT, as shells report it.
INTERRUPTED = 130


def first_line(err: BaseException) -> str:
    """An exception's first message line (its type's name when it has no message)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def report_crash(where: str, err: BaseException) -> int:
    """An error no command foresaw: its traceback, then one line saying what to do; returns
    :data:`NOT_DONE` (Python's own exit status for it, 1, would read as "problems found")."""
    traceback.print_exception(err, file=sys.stderr)
    print(f"{where}: error: unexpected {type(err).__name__}: {first_line(err)} (a bug of headpose-dataprep, or an "
          "input it does not foresee: please report it with the traceback above)", file=sys.stderr)
    return NOT_DONE
