"""How a run ends early: Ctrl-C, SIGTERM, or its Prefect server gone, in one line and a few seconds.

`rlhf run` is the root of a tree (rlhf/core/processes.py): its Prefect server, a preload process and, per
stage, `dvc repro` with the step under it. Ctrl-C in a terminal signals the whole foreground process group at
once, so every one of them died in its own way: the server first, after which the run retried a dead API
for a minute and ended in tracebacks. So each child starts in a session of its own, the signal reaches the
run alone, and the run stops them in order: the running stage (its whole process group, `stop_group`), then
the flow run is recorded as crashed while the server still answers, then the server. The CLI prints the one
line `end` recorded and exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell does.

A second signal while the run stops exits at once: everything it started dies with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, a `kill` or a scheduler, a closed terminal


class Interrupted(KeyboardInterrupt):
    """A signal asked the run to stop. A KeyboardInterrupt, so that Prefect records the flow and task runs as
    crashed (not failed) and lets it through; `code` is the exit status a shell gives for that signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.code = 128 + signum


class ServerGone(Exception):
    """The run's Prefect server stopped answering; `end` holds the line that says so."""


_state: dict = {"handling": 0, "signum": None, "line": None, "code": 0}


def _on_signal(signum: int, frame) -> None:
    if _state["signum"] is not None:  # asked again while stopping: stop now, the children die with us
        if _state["line"]:
            say(_state["line"])
        os._exit(128 + signum)
    _state["signum"] = signum
    _silence()
    raise Interrupted(signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """For the duration (in the main thread): SIGINT, SIGTERM and SIGHUP raise Interrupted, once. A signal this
    process was started with ignored stays ignored (`nohup`, a script's background job: its shell's Ctrl-C is
    not meant for it)."""
    old = {s: signal.signal(s, _on_signal) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    _state["handling"] += 1
    try:
        yield
    finally:
        _state["handling"] -= 1
        for s, handler in old.items():
            signal.signal(s, handler)


@contextmanager
def reclaimed() -> Iterator[None]:
    """Inside a flow run: take SIGTERM back from Prefect's handler when this process is an `interruptible` run
    (`rlhf run`), so that SIGTERM stops it as Ctrl-C does. A run that Prefect's runner started (`rlhf serve`)
    keeps Prefect's handler, which is how a cancel from the UI reaches it."""
    if not _state["handling"]:
        yield
        return
    old = signal.signal(signal.SIGTERM, _on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def end(line: str, code: int) -> None:
    """Record why the run ends early, in one line (the first reason wins): from now on the console shows nothing
    else, and the CLI prints it and exits with `code`."""
    if _state["line"] is None:
        _state["line"], _state["code"] = line, code
        _silence()


def ending() -> tuple[str, int] | None:
    return (_state["line"], _state["code"]) if _state["line"] else None


def say(line: str) -> None:
    """The one line, in one write (a terminal that hung up takes none: nothing to say it to)."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except OSError:
        pass


def signalled() -> int | None:
    """The signal that is stopping this run, if one is."""
    return _state["signum"]


class _QuietWhenEnding(logging.Filter):
    """Once a run ends early its one line says it all: Prefect's crash reports (a line per task and flow run)
    and what a dead API makes its workers log stay off the console; the UI still gets the crashed states."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _state["line"] is None and _state["signum"] is None


_QUIET = _QuietWhenEnding()


def _silence() -> None:
    """Under `rlhf run` (which prints the one line): filter every console handler from now on. Handlers of
    any logger, as Prefect gives its internal loggers their own."""
    if not _state["handling"]:
        return
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if hasattr(v, "handlers"))]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if isinstance(handler, logging.StreamHandler) and _QUIET not in handler.filters:
            handler.addFilter(_QUIET)


def stop_group(proc: subprocess.Popen, timeout: float = 5) -> None:
    """Stop a child started in a session of its own (start_new_session) and everything in its process group
    (dvc, the shell, the step and the step's own children): SIGTERM, then SIGKILL to whatever is left after
    `timeout` seconds. Returns when none of them runs any more."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _group_alive(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _group_alive(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _group_alive(proc: subprocess.Popen) -> bool:
    """Whether any process of proc's group still runs (zombies do not: a container's PID 1 may never reap the
    orphans of a killed dvc)."""
    import psutil

    proc.poll()  # reap the leader itself
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except ProcessLookupError:
            continue
    return False
