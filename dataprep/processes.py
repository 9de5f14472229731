"""Other processes on this machine: whether one still runs, and when it started (``/proc``). One
place for the build lock's holder check and the loader's check on its DataLoader workers."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from contextlib import contextmanager


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


def end_with_build(build_pid: int, poll_s: float = 1.0) -> None:
    """In a loky worker process of the build ``build_pid`` (its parent): end this process when the
    build is gone. Idle loky workers of a build killed with ``kill -9`` (or by the OOM killer)
    otherwise wait ~300 s for work that never comes, holding their memory (a detector's weights,
    say). The build's loky executor runs it as each worker starts (its initializer): a worker whose
    build is already gone ends at once, the others within ``poll_s`` of it (what one was writing is
    a temporary file, which the rerun removes). No other process is touched: the build's own
    (threading backend), dask and ray workers (their parent is not the build)."""
    if not multiprocessing.current_process().name.startswith("LokyProcess") or build_pid == os.getpid():
        return
    if os.getppid() != build_pid:  # reparented: the build is gone
        os._exit(1)

    def watch() -> None:
        while os.getppid() == build_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="dataprep-end-with-build", daemon=True).start()


@contextmanager
def children_without_ctrl_c():
    """Processes started in this block ignore Ctrl-C, and so do theirs: SIGINT is ignored while it
    runs, which a child keeps through exec (Python then installs no KeyboardInterrupt handler). A
    terminal sends Ctrl-C to the whole process group, and each of dask's worker processes printed
    KeyboardInterrupt tracebacks while the build stopped them anyway (loky's ignore it
    themselves). Blocking the signal instead would not reach them: dask starts them from a thread
    of its own. A Ctrl-C during the block itself is lost (a few seconds, as a cluster starts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
