"""A killed run leaves no step behind, even when a shell that forks stands between DVC and the step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from rlhf.core.processes import RUN_PID

# The "run" starts a shell that forks (a compound command), as DVC's shell does on some systems; the shell
# starts a "step" that calls die_with_run. Neither dies with its parent by itself.
STEP = (
    "from rlhf.core.processes import die_with_run; die_with_run(); import time; print('ready', flush=True); "
    "time.sleep({})"
)
RUN = f"""import os, subprocess, sys, time
os.environ[{RUN_PID!r}] = str(os.getpid())
subprocess.Popen(["/bin/sh", "-c", 'true; "$0" -c "$1"', sys.executable, {STEP.format(60)!r}])
time.sleep(60)
"""


def _step_of(run: psutil.Process, timeout: float = 30) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [p for p in run.children(recursive=True) if "die_with_run" in " ".join(p.cmdline())]
        if steps:
            return steps[0]
        time.sleep(0.05)
    raise AssertionError("the step never started")


def test_a_step_exits_when_its_run_is_killed():
    run = subprocess.Popen([sys.executable, "-c", RUN])
    step = _step_of(psutil.Process(run.pid))
    time.sleep(0.5)  # its watcher is up
    assert step.is_running()
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    step.wait(timeout=10)  # raises if it is still running then
    assert not step.is_running()


def test_a_step_outside_a_run_ignores_the_watch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != RUN_PID}
    out = subprocess.run([sys.executable, "-c", STEP.format(0.2)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ready"
