"""Study grids as a user meets them: `rlhf study run|status|report` on a tiny project.

Each configuration x seed runs in its own DVC workspace; the runs share one DVC cache; a bad study fails
before anything is created; a re-run finishes only what is missing.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from datetime import timedelta

import matplotlib.image
import pytest
import yaml

from rlhf.core.errors import UserError
from tests.conftest import BIN, ROOT, TINY, make_project
from tests.faults import start

# TINY, cheaper still (no pre-training, a small SFT set, one epoch, no landscape); the two configurations differ
# only in the policy update, so the second restores prepare and round 1's samples, labels and RM from the cache.
STUDY = {
    "set": {
        "prepare": {"sft": "data/sft_small.jsonl", "tiny": {"pretrain_epochs": 0.0}},
        "train_rm": {"epochs": 1.0},
        "update_policy": {"dpo": {"epochs": 1.0}},
        "evaluate": {"landscape": {"axes": {}}},
    },
    "axes": {"update_policy.dpo.beta": [0.1, 0.5]},
    "seeds": [0],
    "rounds": 1,
    "parallel": 1,
}
RUNS = ["beta=0.1,seed=0", "beta=0.5,seed=0"]


def rlhf(*args, cwd, env=None):
    return subprocess.run(
        [BIN / "rlhf", *args], cwd=cwd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})}
    )


def dvc(*args, cwd):
    return subprocess.run([BIN / "dvc", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def files(folder):
    return {p: p.stat().st_mtime_ns for p in (folder / "data" / "rounds").rglob("*") if p.is_file()}


def ranked_rows(report: str) -> list[list[str]]:
    """The cells of the report's ranked table (its first), row by row."""
    table = report[report.index("| rank |") :].split("\n\n")[0].splitlines()[2:]
    return [line.strip("| ").split(" | ") for line in table]


def write_study(project, name, spec):
    (project / "studies").mkdir(exist_ok=True)
    (project / "studies" / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return f"studies/{name}.yaml"


def test_the_report_says_which_axis_moves_gold_or_forgetting_beyond_seed_noise():
    """A 2 x 2 grid over 2 seeds on hand-made finals: `data` moves gold by 0.2 and `init` by 0.01, against a seed
    noise of 0.028 (each configuration's two seeds 0.04 apart); `init` moves Δ NLL by 0.2 and `data` not at all,
    against 0.014."""
    from rlhf.studies.report import effects_section, level_effects

    runs = [
        {
            "data": d,
            "init": i,
            "configuration": f"data={d},init={i}",
            "gold": (0.2 if d == "concat" else 0.0) + (0.01 if i == "sft" else 0.0) + seed * 0.04,
            "delta_nll": (0.3 if i == "sft" else 0.1) + seed * 0.02,
        }
        for d in ("last", "concat")
        for i in ("sft", "last")
        for seed in (0, 1)
    ]
    levels, noise = level_effects(runs, ["data", "init"])
    assert noise["gold"] == pytest.approx(0.04 / 2**0.5) and noise["delta_nll"] == pytest.approx(0.02 / 2**0.5)
    assert [(lv["axis"], lv["level"], lv["runs"]) for lv in levels] == [
        ("data", "last", 4),
        ("data", "concat", 4),
        ("init", "sft", 4),
        ("init", "last", 4),
    ]
    assert levels[1]["gold"] == pytest.approx(0.225) and levels[2]["delta_nll"] == pytest.approx(0.31)
    text = effects_section(levels, noise)
    assert "| data | concat | 4 | 0.225 ± 0.024 | +0.210 |" in text
    assert "- data, final gold: concat − last = 0.200, 10.0 standard errors (0.020): beyond seed noise." in text
    assert "- init, final gold: sft − last = 0.010, 0.5 standard errors (0.020): within seed noise." in text
    assert "- init, Δ NLL: sft − last = 0.200, 20.0 standard errors (0.010): beyond seed noise." in text
    assert "- data, Δ NLL: " in text and "= 0.000, 0.0 standard errors (0.010): within seed noise." in text
    assert effects_section(*level_effects(runs[::2], ["data", "init"])) == ""  # one seed each: no noise to compare


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("study") / "project", TINY)
    sft = (project / "data" / "sft.jsonl").read_text().splitlines(keepends=True)
    (project / "data" / "sft_small.jsonl").write_text("".join(sft[:600]))  # a cheaper prepare, named by `set`
    return project


@pytest.fixture(scope="module")
def server():
    """A Prefect server for the CLI's runs; the tests read their task runs and artifacts from it."""
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        with get_client(sync_client=True) as client:
            yield str(client.api_url).rstrip("/")


def task_runs(url):
    """The task runs of the latest run of the study flow on the server at `url`, and the artifacts there."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["rlhf-study"])))
        latest = max(runs, key=lambda f: f.created)
        return [t for t in client.read_task_runs() if t.flow_run_id == latest.id], client.read_artifacts()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"axes": {"train_rm.dta": ["last", "concat"]}},
            "studies/bad.yaml: axes: train_rm.dta: unknown key (did you mean train_rm.data?)",
        ),
        (
            {"axes": {"train_rm.data": ["last", "lats"]}},
            "studies/bad.yaml: axes: train_rm.data: input should be 'last', 'concat' or 'sample' (got 'lats')",
        ),
        (
            {"axes": {"update_policy.init": ["liti"], "update_policy.lora.rank": [0, 8]}},
            "studies/bad.yaml: axes: init=liti,rank=8: update_policy.init: liti interpolates full weights",
        ),
        (
            {"set": {"train_rm": {"epochs": 0}}},
            "studies/bad.yaml: set: train_rm.epochs: input should be greater than 0",
        ),
        (
            {"axes": {"runtime.seed": [1, 2]}},
            "studies/bad.yaml: axes: runtime.seed: not a study axis; list the seeds under `seeds:`",
        ),
        (
            {"axes": {"train_rm.data": ["last", "last"]}},
            "studies/bad.yaml: axes: train_rm.data: needs a non-empty list of distinct",
        ),
        ({"axis": {"train_rm.data": ["last"]}}, "studies/bad.yaml: axis: unknown key (did you mean axes?)"),
        ({"parallel": 0}, "studies/bad.yaml: parallel: input should be greater than 0"),
        ({"base": "nope.yaml"}, "nope.yaml: no such file"),
        (
            {
                "axes": {"update_policy.cotrain.ratio": [0, 4]},
                "set": {"update_policy": {"cotrain": {"data": "data/no.jsonl"}}},
            },
            "studies/bad.yaml: ratio=4: data/no.jsonl: no such file (update_policy.cotrain.data)",
        ),
    ],
)
def test_a_bad_study_fails_naming_the_key_before_anything_runs(project, monkeypatch, spec, message):
    from rlhf.orchestration.preflight import check_study
    from rlhf.studies.grid import load_study

    monkeypatch.chdir(project)
    with pytest.raises(UserError) as err:
        check_study(load_study(write_study(project, "bad", {"rounds": 1, **spec})))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (project / "studies" / "bad").exists()


def test_rlhf_study_run_rejects_an_unknown_key_in_one_line(project):
    study = write_study(project, "typo", {"axes": {"train_rm.dta": ["last", "concat"]}, "rounds": 1})
    out = rlhf("study", "run", study, cwd=project)
    assert out.returncode == 2
    assert out.stderr == "error: studies/typo.yaml: axes: train_rm.dta: unknown key (did you mean train_rm.data?)\n"
    assert not (project / "studies" / "typo").exists()


@pytest.mark.parametrize("args", [["study"], ["study", "run"], ["study", "status"], ["study", "report"]])
def test_every_study_command_has_help(tmp_path, args):
    out = rlhf(*args, "--help", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("usage: rlhf study")


@pytest.mark.parametrize(
    ("name", "axes", "runs"),
    [
        ("wolf-mini", {"train_rm.data", "update_policy.init"}, 18),
        ("cotrain-mini", {"update_policy.cotrain.ratio", "prepare.tiny.hidden_size"}, 12),
    ],
)
def test_shipped_studies_are_valid_grids(monkeypatch, name, axes, runs):
    from rlhf.orchestration.preflight import check_study
    from rlhf.studies.grid import load_study

    monkeypatch.chdir(ROOT)
    study = load_study(f"studies/{name}.yaml")
    check_study(study)
    assert set(study.spec.axes) == axes and len(study.runs) == runs and len({r.id for r in study.runs}) == runs


def test_runs_side_by_side_let_waiting_threads_sleep_unless_told_otherwise(monkeypatch):
    """Spinning OpenMP threads of two runs on the same cores starve each other (bench/parallel_runs.py)."""
    from flows.study import run_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert "OMP_WAIT_POLICY" not in run_env(1, "http://127.0.0.1:1/api")  # one at a time: the libraries' default
    assert run_env(2, "http://127.0.0.1:1/api")["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert run_env(2, "http://127.0.0.1:1/api")["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.fixture(scope="module")
def tiny_study(project, server):
    """The tiny study run once through `rlhf study run`, then its state, report, workspaces and records."""
    study = write_study(project, "tiny", STUDY)
    out = rlhf("study", "run", study, cwd=project, env={"PREFECT_API_URL": server})
    assert out.returncode == 0, out.stderr[-3000:]
    return project / "studies" / "tiny", out.stdout + out.stderr, server


def test_a_runs_workspace_gets_the_users_lm_eval_task_and_the_data_beside_it(project, monkeypatch):
    """A task YAML of the user's, named relative to the project, reads its data by a path relative to the project
    too: the run's workspace has both, at the same places."""
    from rlhf.studies.grid import load_study, prepare_workspace

    (project / "lm_tasks").mkdir()
    (project / "lm_tasks" / "tiny.yaml").write_text("task: tiny\ndataset_kwargs: {data_files: lm_tasks/tiny.jsonl}\n")
    (project / "lm_tasks" / "tiny.jsonl").write_text('{"text": "the moon is bright ."}\n')
    monkeypatch.chdir(project)
    spec = {**STUDY, "set": {**STUDY["set"], "evaluate": {"lm_eval": ["lm_tasks/tiny.yaml"]}}}
    run = load_study(write_study(project, "lm", spec)).runs[0]
    prepare_workspace(run, cache=None, root=project)
    for name in ("lm_tasks/tiny.yaml", "lm_tasks/tiny.jsonl"):
        assert (run.folder / name).read_text() == (project / name).read_text()


def test_status_says_every_run_is_done(project, tiny_study):
    out = rlhf("study", "status", "studies/tiny.yaml", cwd=project)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert (
        lines[0] == "studies/tiny: 2 runs (2 configurations x 1 seed x 1 round), 1 at a time" and lines[1] == "2 done"
    )
    assert [line.split()[:3] for line in lines[4:]] == [[run, "done", "1/1"] for run in RUNS]


def test_report_ranks_each_configuration_and_plots_gold_against_sqrt_kl(tiny_study):
    folder, log, _ = tiny_study
    report = (folder / "report" / "report.md").read_text()
    rows = ranked_rows(report)
    gold = {r: json.loads((folder / r / "data/rounds/r01/metrics.json").read_text())["gold"]["mean"] for r in RUNS}
    ranked = sorted(RUNS, key=gold.get, reverse=True)
    assert [row[:3] for row in rows] == [["1", ranked[0][5:8], "1/1"], ["2", ranked[1][5:8], "1/1"]]
    assert [row[3] for row in rows] == [f"**{gold[r]:.3f}** ± –" for r in ranked]  # one seed: no sd
    assert "final round, ranked by gold" in log and " | ".join(rows[0]) in log
    pixels = matplotlib.image.imread(io.BytesIO((folder / "report" / "gold_vs_d.png").read_bytes()), format="png")
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 0
    assert "![gold against d = √KL" in report


def test_each_run_is_its_own_clean_dvc_project_sharing_one_cache(tiny_study):
    folder, *_ = tiny_study
    for run in RUNS:
        ws = folder / run
        assert "up to date" in dvc("status", cwd=ws)
        lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
        assert set(lock) == {
            "prepare",
            "generate@r01",
            "label@r01",
            "train_rm@r01",
            "update_policy@r01",
            "evaluate@r01",
        }
        assert yaml.safe_load((ws / "params.yaml").read_text())["update_policy"]["dpo"]["beta"] == float(run[5:8])
        assert "data/rounds/r01/metrics.json" in dvc("metrics", "show", cwd=ws)
        assert dvc("cache", "dir", cwd=ws).strip() == str(folder / "cache")
    # the second run found prepare and round 1's samples, labels and RM (same seed, same params) in the cache
    log = (folder / RUNS[1] / "run.log").read_text()
    for stage in ("prepare", "generate@r01", "label@r01", "train_rm@r01"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in log
    assert "Running stage 'update_policy@r01'" in log


def test_each_run_is_a_prefect_task_run_and_the_table_an_artifact(tiny_study):
    *_, url = tiny_study
    tasks, artifacts = task_runs(url)
    assert sorted(t.name for t in tasks) == RUNS and all(t.state.is_completed() for t in tasks)
    table = next(a for a in artifacts if a.key == "study-tiny")
    assert sorted(row["configuration"] for row in json.loads(table.data)) == ["beta=0.1", "beta=0.5"]


def test_a_rerun_does_nothing_and_a_lost_round_is_finished_alone(project, tiny_study):
    folder, *_ = tiny_study
    lost, kept = folder / RUNS[0], folder / RUNS[1]
    before = {run: files(folder / run) for run in RUNS}
    metrics = (lost / "data/rounds/r01/metrics.json").read_text()

    again = rlhf("study", "run", "studies/tiny.yaml", cwd=project)
    assert again.returncode == 0 and "2 done, 0 to run" in again.stdout + again.stderr
    assert {run: files(folder / run) for run in RUNS} == before

    subprocess.run(["rm", "-r", lost / "data/rounds/r01"], check=True)
    status = rlhf("study", "status", "studies/tiny.yaml", cwd=project).stdout
    assert f"{RUNS[0]}  incomplete" in status and "outputs of r01 are missing" in status
    again = rlhf("study", "run", "studies/tiny.yaml", cwd=project)
    assert again.returncode == 0 and "1 done, 1 to run" in again.stdout + again.stderr
    assert files(kept) == before[RUNS[1]]  # the other run is untouched
    assert (lost / "data/rounds/r01/metrics.json").read_text() == metrics  # restored from the cache, as it was
    assert {p: t for p, t in files(lost).items() if "r00" in p.parts} == {
        p: t for p, t in before[RUNS[0]].items() if "r00" in p.parts
    }
    assert "Running stage" not in (lost / "run.log").read_text().split("Beginning flow run")[-1]
    assert "up to date" in dvc("status", cwd=lost)


@pytest.mark.slow  # three runs that each start Prefect, DVC and a step before failing: about a minute
def test_failed_runs_report_their_message_and_run_at_most_parallel_at_once(project, server):
    (project / "data" / "broken.txt").write_bytes(b"\xff\xfe not text\n")
    study = write_study(
        project,
        "broken",
        {
            "set": {"prepare": {"pretrain": "data/broken.txt"}},
            "axes": {"train_rm.epochs": [1.0, 2.0, 3.0]},
            "rounds": 1,
            "parallel": 2,
        },
    )
    out = rlhf("study", "run", study, cwd=project, env={"PREFECT_API_URL": server})
    assert out.returncode == 2
    message = "stage prepare failed: data/broken.txt: not valid UTF-8 (byte 0)"
    assert out.stderr.splitlines()[-1] == (
        f"error: 3 of 3 runs failed, first epochs=1.0,seed=0: {message} (see `rlhf study status {study}`)"
    )
    status = rlhf("study", "status", study, cwd=project).stdout
    assert status.splitlines()[1] == "3 failed" and status.count(message) == 3
    tasks, _ = task_runs(server)
    assert len(tasks) == 3 and all(t.state.is_failed() for t in tasks)
    at = [t.start_time + timedelta(microseconds=1) for t in tasks]
    in_flight = [sum(t.start_time <= moment < t.end_time for t in tasks) for moment in at]
    assert max(in_flight) == 2  # two ran side by side, never three
    assert "| – | 1.0 | 0/1 | – |" in (project / "studies/broken/report/report.md").read_text()


@pytest.mark.slow  # two runs that each start Prefect, DVC and prepare before they are stopped: about a minute
def test_ctrl_c_stops_every_run_in_one_line_and_the_study_resumes_them(project, server):
    """Ctrl-C in the terminal (SIGINT to the study's whole process group) reaches the study alone, which stops
    each run in flight: one line, status 130, no traceback, nothing left running, each run `interrupted`
    with the line its own `rlhf run` said, and what they finished recorded."""
    import signal
    import time

    import psutil

    study = write_study(project, "stop", {**STUDY, "parallel": 2})
    folder = project / "studies" / "stop"
    logs = [folder / run / "run.log" for run in RUNS]
    with open(project / "stop.log", "w") as err:
        proc = start(project, "study", "run", study, env={**os.environ, "PREFECT_API_URL": server}, stderr=err)
        deadline = time.monotonic() + 300
        while not all(log.is_file() and "Running stage 'prepare'" in log.read_text() for log in logs):
            assert proc.poll() is None and time.monotonic() < deadline, (project / "stop.log").read_text()[-3000:]
            time.sleep(0.2)
        tree = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    out = (project / "stop.log").read_text()
    assert code == 130 and "Traceback" not in out, out[-3000:]
    assert out.splitlines()[-1] == (
        f"interrupted (SIGINT): 2 runs stopped where `rlhf study run {study}` resumes them, 0 of 2 done"
    )
    time.sleep(1)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    status = rlhf("study", "status", study, cwd=project).stdout
    for run in RUNS:
        line = next(line for line in status.splitlines() if line.startswith(run))
        assert " interrupted " in line and "interrupted (SIGINT) in round " in line, status


@pytest.mark.slow  # the embedded default's real size: 3 configurations x 2 seeds x 2 rounds, killed and resumed
def test_a_reduced_default_study_is_killed_resumed_reported_and_reproducible(tmp_path, server):
    import signal
    import time

    import psutil

    project = make_project(tmp_path / "project", subset=False)
    study = write_study(
        project,
        "reduced",
        {
            "set": {"train_rm": {"sample_size": 200}},
            "axes": {"train_rm.data": ["last", "concat", "sample"]},
            "seeds": [0, 1],
            "rounds": 2,
            "parallel": 2,
        },
    )
    folder = project / "studies" / "reduced"
    runs = [f"data={d},seed={s}" for d in ("last", "concat", "sample") for s in (0, 1)]

    def done():
        return [
            r
            for r in runs
            if (folder / r / "study-run.json").is_file()
            and json.loads((folder / r / "study-run.json").read_text())["state"] == "done"
        ]

    with open(tmp_path / "first.log", "w") as log:  # killed like a preempted machine: the whole process group
        first = subprocess.Popen(
            [BIN / "rlhf", "study", "run", study],
            cwd=project,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PREFECT_API_URL": server},
            start_new_session=True,
        )
        deadline = time.monotonic() + 3600
        while not done() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(2)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finished = done()
    assert finished and len(finished) < len(runs), (tmp_path / "first.log").read_text()[-3000:]
    time.sleep(1)
    assert not [p for p in psutil.process_iter(["cwd"]) if str(folder) in (p.info["cwd"] or "")]  # nothing left running
    status = rlhf("study", "status", study, cwd=project).stdout
    assert "interrupted" in status and status.count(" done ") == len(finished)
    before = {r: files(folder / r) for r in finished}

    out = rlhf("study", "run", study, cwd=project, env={"PREFECT_API_URL": server})
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{len(finished)} done, {len(runs) - len(finished)} to run" in out.stdout + out.stderr
    assert {r: files(folder / r) for r in finished} == before  # what finished was not run again
    assert rlhf("study", "status", study, cwd=project).stdout.splitlines()[1] == "6 done"

    report = (folder / "report" / "report.md").read_text()
    rows = ranked_rows(report)
    assert [row[0] for row in rows] == ["1", "2", "3"] and {row[1] for row in rows} == {"last", "concat", "sample"}
    golds = [float(row[3].split("**")[1]) for row in rows]
    assert golds == sorted(golds, reverse=True) and all(row[2] == "2/2" and "± 0." in row[3] for row in rows)
    pixels = matplotlib.image.imread(io.BytesIO((folder / "report" / "gold_vs_d.png").read_bytes()), format="png")
    assert pixels.shape[0] > 200 and pixels.std() > 0

    tasks, _ = task_runs(server)  # the resumed study: at most two runs at once, and two side by side
    at = [t.start_time + timedelta(microseconds=1) for t in tasks]
    assert max(sum(t.start_time <= moment < t.end_time for t in tasks) for moment in at) == 2

    ws = folder / "data=sample,seed=1"  # found and reproduced with DVC: a round-2 RM, bit for bit
    assert "up to date" in dvc("status", cwd=ws) and "Running stage" not in dvc("repro", cwd=ws)
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    rm = lock["train_rm@r02"]["outs"][0]["md5"]
    subprocess.run(["rm", "-r", ws / "data/rounds/r02/reward_model"], check=True)
    assert "Running stage 'train_rm@r02'" in dvc("repro", "--force", "--single-item", "train_rm@r02", cwd=ws)
    assert yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["train_rm@r02"]["outs"][0]["md5"] == rm
