"""Child processes: ones that die with the process that started them, and the helpers every parent uses
(a free port, stopping a child, relaying its output and keeping its one-line error).

A run is a tree: `rlhf run` (the flow) starts a Prefect API server and, per stage, `dvc repro`, which
starts the step. When a preempted or killed run loses its root, nothing below it may go on: an orphaned
step would race the next run's step on the same files, and an orphaned server would hold memory and a
port forever. Linux delivers SIGKILL to a process whose parent dies once it asks (prctl
PR_SET_PDEATHSIG), and the request survives exec; elsewhere these helpers are plain. The step is further
down: DVC starts it through a shell, and a shell that forks (as some /bin/sh do) outlives DVC, so a step
also watches the run's own process (RLHF_RUN_PID) and exits when it is gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterable


def die_with_parent() -> None:
    """Ask to be killed when the parent process dies (Linux; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        sys.exit(137)


RUN_PID = "RLHF_RUN_PID"


def die_with_run() -> None:
    """In a step started by a run: exit as soon as the run's process (RLHF_RUN_PID) is gone, whatever lies
    between (dvc, a shell)."""
    if (pid := os.environ.get(RUN_PID, "")).isdigit():
        die_with(int(pid))


def die_with(pid: int) -> None:
    """Exit (status 137) as soon as process `pid` is gone: a pidfd wakes a daemon thread then (Linux 5.3+)."""
    import select
    import threading

    if not hasattr(os, "pidfd_open"):
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # gone already
        os._exit(137)
    except (OSError, ValueError):  # an old kernel, or not ours to watch
        return

    def watch() -> None:
        select.select([fd], [], [])
        os._exit(137)

    threading.Thread(target=watch, name=f"die-with-{pid}", daemon=True).start()


def dying_with_parent(module: str, *args: str) -> list[str]:
    """The command line of `python -m module args...` as a process that dies with its parent."""
    code = (
        "from rlhf.core.processes import die_with_parent; die_with_parent(); import runpy; "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", code, *args]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it), for a server or a launch about to start."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds; waits for it either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def relay(lines: Iterable[str], emit: Callable[[str], None], keep: int = 20) -> deque[str]:
    """Pass a child's non-empty output lines to `emit` as they come; returns the last `keep` of them."""
    tail: deque[str] = deque(maxlen=keep)
    for line in lines:
        if line := line.rstrip():
            emit(line)
            tail.append(line)
    return tail


def error_line(lines: Iterable[str], fallback: str = "no output") -> str:
    """What went wrong in a child, in one line: its own last `error: ...` line (this project's CLI), else
    DVC's last `ERROR: ...`, else its last line."""
    lines = list(lines)
    ours = [t.removeprefix("error:").strip() for t in lines if t.startswith("error:")]
    theirs = [t.removeprefix("ERROR:").strip() for t in lines if t.startswith("ERROR:")]
    return (ours or theirs or lines or [fallback])[-1]


def peak_memory() -> str:
    """This process's peak memory, in words: its own resident high-water mark (VmHWM; ru_maxrss would start at
    what its parent held when it forked, Linux keeping the largest across exec) and, where it used a GPU, the
    most torch allocated there."""
    try:
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = f"peak memory {rss:,.0f} MiB"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f" (GPU: {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB allocated at most)"
    return text
