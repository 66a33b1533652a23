"""Ctrl-C in a local study while a run is still preparing its workspace (issue 30).

The study passes a signal on to the runs whose `rlhf run` has started (flows/study.py, stop_runs). A run submitted
just before it, still in prepare_workspace, had none to pass it to: it started `rlhf run` afterwards, in a session
of its own that the terminal's Ctrl-C never reached, and the flow waited on it until a second Ctrl-C. Here the
run's inputs take seconds to copy into its workspace (a folder of many small files), and the study gets one SIGINT
to its whole process group, as a terminal sends it, while they are being copied.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import psutil

from tests.faults import start
from tests.test_study import STUDY, project, rlhf, server, write_study  # noqa: F401 (project, server: fixtures)

FILES = 20_000  # seconds of copying on any machine: the window the signal lands in
RUN = "beta=0.1,seed=0"


def test_ctrl_c_while_a_run_prepares_its_workspace_ends_the_study_and_the_run_never_starts(project, server):  # noqa: F811
    many = project / "data" / "cotrain_many"  # named by the params (update_policy.cotrain.data), so copied
    many.mkdir()
    for i in range(FILES):
        (many / f"{i:05d}.jsonl").write_text("{}\n")
    spec = {
        **STUDY,
        "set": {**STUDY["set"], "update_policy": {"dpo": {"epochs": 1.0}, "cotrain": {"data": "data/cotrain_many"}}},
        "axes": {"update_policy.dpo.beta": [0.1]},
    }
    study = write_study(project, "early", spec)
    copied = project / "studies" / "early" / RUN / "data" / "cotrain_many"
    log = project / "early.log"
    with open(log, "w") as err:
        proc = start(project, "study", "run", study, env={**os.environ, "PREFECT_API_URL": server}, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not copied.is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)  # one Ctrl-C
        sent = time.monotonic()
        assert len(os.listdir(copied)) < FILES, "the workspace was ready before the signal: copy more files"
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        took = time.monotonic() - sent
        assert proc.returncode is not None, f"the study still runs {took:.0f} s after one Ctrl-C"
    finally:
        if proc.poll() is None:  # its `rlhf run`, in a session of its own, too
            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    assert out.splitlines()[-1] == (
        f"interrupted (SIGINT): 1 runs stopped where `rlhf study run {study}` resumes them, 0 of 1 done"
    )
    assert (copied.parent.parent / "run.log").read_text() == ""  # its `rlhf run` never started
    status = rlhf("study", "status", study, cwd=project).stdout
    line = next(line for line in status.splitlines() if line.startswith(RUN))
    assert " interrupted " in line and "interrupted (SIGINT) before `rlhf run` started" in line, status
