"""Other processes on this machine: whether one still runs, and when it started (``/proc``). One
place for the build lock's holder check and the loader's check on its DataLoader workers."""
from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs here (one of another user counts). A zombie does not: a killed
    process its parent has not reaped yet (a notebook, a container without an init) still has
    its pid, but it will never run again."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    return _stat_field(pid, 0) not in ("Z", "X")  # zombie, dead


def process_start(pid: int) -> str:
    """Process ``pid``'s start time (clock ticks since boot, from ``/proc``); "" where unknown. With
    the pid, it names one process: a pid is reused, its start time with it is not."""
    return _stat_field(pid, 19)


def _stat_field(pid: int, index: int) -> str:
    """Field ``index`` of ``/proc/PID/stat`` counted from the one after the command name (0: the
    state, 19: the start time); "" where unknown (no ``/proc``, no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()[index].decode()
    except (OSError, ValueError, IndexError):
        return ""
