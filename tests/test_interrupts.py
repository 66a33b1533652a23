"""Faults a long run meets, as a user meets them: Ctrl-C, SIGTERM, a second command, its server gone.

One quick project (tests/faults.py) goes through them in turn, each `rlhf run` held still inside a stage:
run A gets Ctrl-C (SIGINT to its whole process group, as a terminal sends it) in label@r01, while a second
`rlhf run` and the stage's command run by hand are refused; run B gets SIGTERM (to its process alone, as
`kill` or a scheduler sends it) in evaluate@r01; run C finishes what is left. Each interrupted run must exit
130 or 143 within 15 s with one line saying where `rlhf run` resumes, and no traceback; its Prefect flow run is
recorded as crashed; C redoes nothing that was finished. Then, with `rlhf server` as the run's server, the
server is killed in the middle of a stage: the run ends when the stage does, in one line, the stage recorded.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import time

import psutil
import pytest

from rlhf.core.processes import free_port, stop
from tests.conftest import BIN
from tests.faults import env_for, hold, quick_project, recorded, release, start, wait_held

ORDER = ["prepare", *(f"{s}@r01" for s in ("generate", "label", "train_rm", "update_policy", "evaluate"))]


def interrupt(project, env, log, stage: str, send) -> dict:
    """Run `rlhf run` until `stage` is held, call send(proc), and return what happened after."""
    hold(project, stage)
    with log.open("ab") as err:
        proc = start(project, "run", env=env, stderr=err)
    try:
        wait_held(project, proc)
        tree = psutil.Process(proc.pid).children(recursive=True)
        offset = log.stat().st_size
        second = others(project, env)  # while it holds the project
        sent = time.monotonic()
        send(proc)
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        release(project)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1)
    left = [p for p in tree if running(p)]
    after = log.read_bytes()[offset:].decode()
    return {"code": code, "took": took, "after": after, "left": left, "second": second, "done": recorded(project)}


def running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def others(project, env) -> dict:
    """A second `rlhf run`, and the held stage's command by hand, while the first run holds the project."""
    out = {}
    for name, args in (("run", ["run"]), ("step", ["label", "r01"])):
        began = time.monotonic()
        done = subprocess.run([BIN / "rlhf", *args], cwd=project, env=env, capture_output=True, text=True, timeout=120)
        out[name] = (done.returncode, done.stderr, time.monotonic() - began)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("interrupts")
    project = quick_project(base / "project")
    env = env_for(base)
    log = base / "stderr.log"
    a = interrupt(project, env, log, "label@r01", lambda p: os.killpg(p.pid, signal.SIGINT))
    stamps = {f: f.stat().st_mtime_ns for f in (project / "data" / "rounds").rglob("*") if f.is_file()}
    b = interrupt(project, env, log, "evaluate@r01", lambda p: p.send_signal(signal.SIGTERM))
    c = subprocess.run([BIN / "rlhf", "run"], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    return project, base, a, b, c, stamps, log


def test_ctrl_c_stops_the_run_in_one_line_with_status_130(runs):
    _, _, a, _, _, _, log = runs
    assert a["code"] == 130 and a["took"] < 15, a
    assert a["after"].strip().splitlines() == [
        "interrupted (SIGINT) in round r01, step label, which was stopped; the stages before it are recorded in "
        "dvc.lock, and `rlhf run` resumes at label@r01"
    ]
    assert "Traceback" not in log.read_text()
    assert a["done"] == set(ORDER[:2])  # label@r01 was stopped before DVC could record it


def test_sigterm_stops_the_run_in_one_line_with_status_143(runs):
    _, _, _, b, _, _, _ = runs
    assert b["code"] == 143 and b["took"] < 15, b
    assert b["after"].strip().splitlines() == [
        "interrupted (SIGTERM) in round r01, step evaluate, which was stopped; the stages before it are recorded "
        "in dvc.lock, and `rlhf run` resumes at evaluate@r01"
    ]
    assert b["done"] == set(ORDER[:5])


def test_an_interrupted_run_leaves_nothing_running(runs):
    _, _, a, b, _, _, _ = runs
    assert a["left"] == [] and b["left"] == []  # its server, preload process, dvc and the step


def test_a_second_command_is_refused_at_once_naming_the_first(runs):
    _, _, a, _, _, _, _ = runs
    for name in ("run", "step"):
        code, stderr, took = a["second"][name]
        assert code == 2 and took < 20, (name, stderr)
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
        assert "error: .dvc/tmp/rlhf-project.lock: PID " in stderr and "(rlhf run) is running in this project" in stderr
    # the first run was unharmed: it went on to its Ctrl-C, which found it in label@r01 as before
    assert a["code"] == 130


def test_the_interrupted_flow_runs_are_recorded_as_crashed(runs):
    _, base, *_ = runs
    db = sqlite3.connect(base / "prefect" / "prefect.db")
    flows = [state for (state,) in db.execute("select state_type from flow_run order by created")]
    tasks = dict(db.execute("select name, state_type from task_run where state_type = 'CRASHED'"))
    assert flows == ["CRASHED", "CRASHED", "COMPLETED"]
    assert tasks == {"r01-label": "CRASHED", "r01-evaluate": "CRASHED"}


def test_a_rerun_resumes_at_the_interrupted_stage_and_completes(runs):
    project, _, _, _, c, stamps, _ = runs
    assert c.returncode == 0, c.stderr[-3000:]
    assert recorded(project) == set(ORDER)
    skipped = [line for line in c.stderr.splitlines() if "didn't change, skipping" in line]
    assert len(skipped) == 5  # every stage before evaluate@r01
    assert all(f.stat().st_mtime_ns == t for f, t in stamps.items())  # nothing finished before B was redone


def test_a_server_gone_mid_run_ends_it_when_the_stage_ends(tmp_path):
    project = quick_project(tmp_path / "project")
    env = {k: v for k, v in env_for(tmp_path).items() if k != "PREFECT_API_URL"}
    port = free_port()
    server = subprocess.Popen(
        [BIN / "rlhf", "server", "--port", str(port)],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    log = tmp_path / "stderr.log"
    try:
        deadline = time.monotonic() + 120
        while not (project / ".prefect" / "server.json").exists():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        hold(project, "label@r01")
        with log.open("ab") as err:
            run = start(project, "run", env=env, stderr=err)
        wait_held(project, run)
        os.killpg(server.pid, signal.SIGKILL)  # the server crashes
        server.wait()
        offset = log.stat().st_size
        release(project)
        released = time.monotonic()
        code = run.wait(timeout=120)
        took = time.monotonic() - released
    finally:
        release(project)
        stop(server)
    after = log.read_bytes()[offset:].decode().strip().splitlines()
    assert code == 2 and took < 30  # the stage's last second, then a few to end
    assert after[-1].startswith(
        f"error: the Prefect server at http://127.0.0.1:{port}/api stopped answering; label@r01 "
    )
    logged = re.compile(r"\d\d:\d\d:\d\d ")  # the stage's own log lines, at any hour of the day
    assert [line for line in after if not logged.match(line)] == after[-1:]
    assert "Traceback" not in log.read_text()
    assert recorded(project) == set(ORDER[:3])
