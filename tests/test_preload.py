"""A flow's steps run in processes forked from a preload process (rlhf/orchestration/preload.py): a step's command hands
its work over, imports none of the ML libraries itself, and behaves exactly as if it had run the step."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from rlhf.orchestration.preload import ENV, preloaded

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload process is Linux-only")


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory):
    dest = tmp_path_factory.mktemp("preload") / "project"
    shutil.copytree(tiny_project, dest, symlinks=True)
    return dest


@pytest.fixture(scope="module")
def preload():
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with preloaded(env):
        yield {**env, ENV: os.environ[ENV]}


def step(project, env, *args, importtime=False):
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "rlhf", *args]
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)


def test_a_preloaded_step_imports_no_torch_and_writes_what_a_fresh_process_writes(project, preload):
    samples = project / "data/rounds/r01/samples.jsonl"
    fresh = step(project, {k: v for k, v in preload.items() if k != ENV}, "generate", "r01", importtime=True)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "| torch\n" in fresh.stderr  # the check below can fail: a fresh process does import it
    expected = samples.read_bytes()
    samples.unlink()
    handed = step(project, preload, "generate", "r01", importtime=True)
    assert handed.returncode == 0, handed.stderr[-2000:]
    assert "| torch\n" not in handed.stderr
    assert '"samples":' in handed.stdout  # the step's summary, on the command's own stdout
    assert samples.read_bytes() == expected
    for out in (fresh, handed):  # what the step cost, its last log line: its own process's peak, not its parent's
        cost = re.search(r"generate r01: [\d.]+ s, peak memory ([\d,]+) MiB, wrote ([\d.]+) MiB", out.stderr)
        assert cost and 100 < int(cost[1].replace(",", "")) < 4000, out.stderr[-500:]
        assert float(cost[2]) == pytest.approx(samples.stat().st_size / 2**20, abs=0.06)


def test_a_preloaded_step_fails_with_its_one_line_error_and_status(project, preload):
    out = step(project, preload, "train_rm", "r09")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: params.yaml: rounds: no round 'r09' (have r01)"]


def test_killing_the_command_ends_the_step_it_handed_over(project, preload):
    command = subprocess.Popen(
        [sys.executable, "-m", "rlhf", "generate", "r01"],
        cwd=project,
        env=preload,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, worker = time.monotonic() + 60, None
    while worker is None:
        assert time.monotonic() < deadline and command.poll() is None, "the step was never handed over"
        worker = next(
            (
                p
                for p in psutil.process_iter(["cmdline"])
                if p.pid != command.pid and " ".join(p.info["cmdline"] or []).split() == ["rlhf", "generate", "r01"]
            ),
            None,
        )
        time.sleep(0.05)
    worker.suspend()  # held still, so that it cannot finish before the kill lands
    command.send_signal(signal.SIGKILL)
    command.wait()
    worker.resume()
    worker.wait(timeout=10)  # gone at once (psutil.TimeoutExpired otherwise)
    assert not worker.is_running()
