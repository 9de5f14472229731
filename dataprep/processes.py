"""Other processes on this machine: whether one still runs, and when it started (``/proc``). One
place for the build lock's holder check and the loader's check on its DataLoader workers."""
from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists here (one of another user counts: it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def process_start(pid: int) -> str:
    """Process ``pid``'s start time (clock ticks since boot, from ``/proc``); "" where unknown. With
    the pid, it names one process: a pid is reused, its start time with it is not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return ""
