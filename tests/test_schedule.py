"""Continuing an iteration on a schedule: rounds added to params.yaml as text, schedules checked up front,
and (slow) `rlhf server` + `rlhf serve --interval 60` running a scheduled round that continues the last one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest
import yaml

from rlhf.core.errors import UserError
from rlhf.core.processes import free_port
from rlhf.core.rounds import with_rounds_upto
from tests.conftest import BIN, ROOT, TINY, make_project

PARAMS = (ROOT / "params.yaml").read_text()


def test_adding_rounds_keeps_every_comment_and_line_of_params():
    text = with_rounds_upto(PARAMS, 5)
    assert yaml.safe_load(text)["rounds"] == {"r01": "r00", "r02": "r01", "r03": "r02", "r04": "r03", "r05": "r04"}
    added = [line for line in text.splitlines() if line not in PARAMS.splitlines()]
    assert added == ["  r04: r03", "  r05: r04"]  # in the block's indentation, nothing else touched
    assert with_rounds_upto(PARAMS, 2) == PARAMS  # never removes a round


def test_rounds_at_the_end_of_the_file_and_without_newline():
    text = with_rounds_upto("seed: 1\nrounds:\n    r01: r00   # first\n    r02: r01", 3)
    assert text == "seed: 1\nrounds:\n    r01: r00   # first\n    r02: r01\n    r03: r02\n"


@pytest.mark.parametrize("text", ["rounds: {r01: r00}\n", "seed: 1\n"])
def test_rounds_that_cannot_be_extended_as_text_are_named(text):
    with pytest.raises(UserError, match="params.yaml: .*rounds"):
        with_rounds_upto(text, 2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cron", "every night"], "--cron: not a cron expression: 'every night'"),
        (["--interval", "-5"], "--interval must be a positive number of seconds"),
        (["--interval", "60", "--more", "0"], "--more must be at least 1"),
        (["--interval", "60"], "no Prefect server to serve on: start one with `rlhf server`"),
    ],
)
def test_serve_refuses_bad_schedules_and_a_missing_server_in_one_line(tmp_path, args, message):
    project = make_project(tmp_path / "p", TINY)
    env = dict(os.environ)
    if "server" not in message:  # a server that is never reached: the schedule is refused before any call
        env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    out = subprocess.run(
        [BIN / "rlhf", "serve", *args], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [f"error: {out.stderr.strip()[7:]}"]
    assert message in out.stderr, out.stderr


def _post(api: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        f"{api}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


@pytest.mark.slow
def test_a_served_schedule_runs_the_next_round_on_time(tmp_path):
    """r01 done by `rlhf run --more 1`; then `rlhf server` and `rlhf serve --interval 60`: the first scheduled
    run starts within a minute, adds r02 to params.yaml, runs only r02's steps, and completes."""
    project = make_project(tmp_path / "p", TINY)
    subprocess.run([BIN / "rlhf", "run"], cwd=project, check=True, capture_output=True, timeout=900)
    server = subprocess.Popen(
        [BIN / "rlhf", "server", "--port", str(free_port())],
        cwd=project,
        stdout=(tmp_path / "server.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    record = project / ".prefect" / "server.json"
    serve = None
    try:
        deadline = time.monotonic() + 120
        while not record.exists():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        api = json.loads(record.read_text())["api_url"]
        serve = subprocess.Popen(
            [BIN / "rlhf", "serve", "--interval", "60", "--name", "nightly"],
            cwd=project,
            stdout=(tmp_path / "serve.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 600
        while True:
            runs = [r for r in _post(api, "/flow_runs/filter", {"sort": "START_TIME_ASC"}) if r["start_time"]]
            if runs and runs[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED"):
                break
            assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
        first = runs[0]
        assert first["state_type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert first["name"] == "r02" and first["parameters"] == {"more": 1}
        late = _ts(first["start_time"]) - _ts(first["expected_start_time"])
        assert late < 60, f"started {late:.0f} s after its scheduled time"
        tasks = _post(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [first["id"]]}}})
        assert sorted(t["name"] for t in tasks) == sorted(
            ["r00-prepare", "r02-generate", "r02-label", "r02-train_rm", "r02-update_policy", "r02-evaluate"]
        )
        assert list(yaml.safe_load((project / "params.yaml").read_text())["rounds"]) == ["r01", "r02"]
        assert (project / "data/rounds/r02/metrics.json").is_file()
        lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
        assert "evaluate@r02" in lock
    finally:
        for proc in (serve, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)


def _ts(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
