"""Crash and resume, determinism and secrets, through `rlhf run` as a user (or a preempted machine) meets it.

Two fresh copies of the tiny project run the same params. A runs straight through. B is killed with
SIGKILL during each step in turn (prepare, then each of round 1's steps), and `rlhf run` is started again
after every kill: each restart must skip what finished and resume at the interrupted step. B ends with
exactly A's dvc.lock output hashes (determinism across fresh runs and across crashes), no process of a
killed run (its Prefect server, dvc, the step) is left behind, and the secrets planted in B's environment
appear in none of its outputs.
Slow: about two full tiny runs and six restarts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from rlhf.core.paths import STEPS
from tests.conftest import BIN, TINY, make_project

pytestmark = pytest.mark.slow
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "rlhf-planted-aws-secret-5c1f",
    "HF_TOKEN": "hf_plantedtoken9d2e7a",
    "WANDB_API_KEY": "planted-wandb-key-41b0",
}


def out_hashes(project: Path) -> dict:
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {stage: sorted((o["path"], o["md5"]) for o in entry.get("outs", [])) for stage, entry in lock.items()}


def step_processes(project: Path, step: str | None = None) -> list[psutil.Process]:
    """Processes of this project's steps (`rlhf <step> ...`, as DVC starts them)."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(p.info["cmdline"] or []).split()  # a preloaded step's title is one padded string
        at = next((i for i, c in enumerate(cmd) if c == "rlhf" or c.endswith("/rlhf")), None)
        if p.info["cwd"] == str(project) and at is not None and cmd[at + 1 : at + 2] and cmd[at + 1] in STEPS:
            if step is None or cmd[at + 1] == step:
                found.append(p)
    return found


def snapshot(project: Path) -> tuple[set, dict]:
    """The stages dvc.lock records as done, and the modification time of every file they output."""
    done = out_hashes(project) if (project / "dvc.lock").exists() else {}
    files = {}
    for outs in done.values():
        for path, _ in outs:
            out = project / path
            for f in [out] if out.is_file() else out.rglob("*"):
                files[f] = f.stat().st_mtime_ns
    return set(done), files


def still_running(p: psutil.Process) -> str | None:
    """The start of p's command line if p is alive (not gone, not a zombie), else None."""
    try:
        return " ".join(p.cmdline()[:4]) if p.status() != psutil.STATUS_ZOMBIE else None
    except psutil.NoSuchProcess:
        return None


def start_run(project: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [BIN / "rlhf", "run"], cwd=project, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("crash")
    env = {**os.environ, "PREFECT_HOME": str(base / "prefect")}
    straight = make_project(base / "straight", TINY)
    subprocess.run([BIN / "rlhf", "run"], cwd=straight, env=env, check=True, capture_output=True, timeout=1200)

    crashed = make_project(base / "crashed", TINY)
    env_b = {**env, **SECRETS}
    log = base / "crashed.log"
    history = []
    for step in ("prepare", "generate", "label", "train_rm", "update_policy", "evaluate"):
        before = snapshot(crashed)
        run = start_run(crashed, env_b, log)
        deadline = time.monotonic() + 600
        while not (steps := step_processes(crashed, step)):  # wait until the step is under way
            assert run.poll() is None, f"the run ended before {step} started"
            assert time.monotonic() < deadline
            time.sleep(0.02)  # a preloaded step can be over in half a second (label with the rubric)
        # Held still at once, so that the kill lands inside the step on a machine of any speed: a step whose
        # command is held cannot exit, so DVC cannot record it as done even where its work is finished.
        for p in steps:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.suspend()
        tree = psutil.Process(run.pid).children(recursive=True)  # its Prefect server, dvc, the step
        run.send_signal(signal.SIGKILL)
        run.wait()
        for p in steps:  # a preloaded step may already be gone: it dies with the run's preload process
            with contextlib.suppress(psutil.NoSuchProcess):
                p.resume()
        time.sleep(2.0)
        orphans = [title for title in map(still_running, tree) if title]
        history.append({"step": step, "before": before, "after": snapshot(crashed), "orphans": orphans})
    final = subprocess.run([BIN / "rlhf", "run"], cwd=crashed, env=env_b, capture_output=True, text=True, timeout=1200)
    log.open("a").write(final.stdout + final.stderr)
    assert final.returncode == 0, final.stderr[-3000:]
    return straight, crashed, history, log


def test_a_killed_run_leaves_nothing_running(runs):
    _, _, history, _ = runs
    assert all(h["orphans"] == [] for h in history), [(h["step"], h["orphans"]) for h in history]


def test_each_restart_resumes_at_the_interrupted_step(runs):
    _, _, history, _ = runs
    order = ["prepare", *(f"{s}@r01" for s in ("generate", "label", "train_rm", "update_policy", "evaluate"))]
    for i, h in enumerate(history):
        (done_before, files_before), (done_after, files_after) = h["before"], h["after"]
        assert done_before == set(order[: max(i - 1, 0)])  # the step killed last time was left unfinished
        assert done_after == set(order[:i]), h["step"]  # ... this run finished it, then was killed in the next
        # nothing that had finished was redone: every output of a finished stage is untouched
        assert all(files_after.get(p) == t for p, t in files_before.items()), h["step"]


def test_crashed_and_straight_runs_end_with_identical_hashes(runs):
    straight, crashed, _, _ = runs
    assert out_hashes(crashed) == out_hashes(straight)
    assert set(out_hashes(straight)) == {
        "prepare",
        "generate@r01",
        "label@r01",
        "train_rm@r01",
        "update_policy@r01",
        "evaluate@r01",
    }


def test_planted_secrets_appear_in_no_output(runs):
    _, crashed, _, log = runs
    places = [
        log,
        *(p for p in crashed.rglob("*") if p.is_file()),
        *(p for p in (crashed.parent / "prefect").rglob("*") if p.is_file()),
    ]
    for path in places:
        data = path.read_bytes()
        for name, secret in SECRETS.items():
            assert secret.encode() not in data, f"{name} leaked into {path}"
