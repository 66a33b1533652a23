"""Processes that die with the process that started them.

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
import time
from contextlib import contextmanager
from typing import Iterator

from rlhf.errors import UserError


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
    code = ("from rlhf.lifetime import die_with_parent; die_with_parent(); import runpy; "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code, *args]


@contextmanager
def temporary_prefect_server(timeout: float = 60) -> Iterator[str]:
    """Prefect's temporary API server for a run without PREFECT_API_URL (as Prefect's own ephemeral mode
    starts it, on a free loopback port, no UI), but dying with this process. Yields its API URL."""
    import importlib.util
    import socket
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    site = Path(importlib.util.find_spec("prefect").origin).parent.parent
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # offline: no telemetry errors in the log
    cmd = dying_with_parent("uvicorn", "--app-dir", str(site), "--factory", "prefect.server.api.server:create_app",
                            "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on")
    url = f"http://127.0.0.1:{port}/api"
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise UserError(f"the temporary Prefect server on port {port} did not start "
                                    f"(exit code {proc.poll()}); set PREFECT_API_URL to use a running one") from None
                time.sleep(0.2)
        print(f"Prefect: a temporary API server for this run at {url} (no UI; it stops with the run); to keep "
              "runs and browse them, start a server and set PREFECT_API_URL", file=sys.stderr)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def prefect_api() -> Iterator[str]:
    """The Prefect API a flow run reports to: PREFECT_API_URL if set, else the project's `rlhf server` if one
    runs, else a temporary server for this process (which its child processes, e.g. a study's runs, share).
    On the way out the run's last log lines are sent while the server still listens."""
    from contextlib import nullcontext

    from rlhf.server import project_server

    given = os.environ.get("PREFECT_API_URL") or project_server()
    with nullcontext(given) if given else temporary_prefect_server() as url:
        os.environ["PREFECT_API_URL"] = url  # before Prefect reads its settings
        try:
            yield url
        finally:
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
