"""A study across machines, on loopback: a real Prefect server (`rlhf server`), a process work pool with two
workers started from two folders of their own, and an S3 API server (moto) as the shared DVC remote.

`rlhf study run --pool` submits the four runs; the workers clone the project's commit, each runs at least one
run, and `prepare` is computed once per seed in the whole study. One worker is killed (its whole process tree,
as a machine dies) in the middle of a run: the study notices the missing heartbeats, submits the run again,
and it finishes on the other worker, restoring the rounds it had pushed. Status and report, from a fresh clone
that never saw a worker's disk, agree with the same study run on this machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from rlhf.core.errors import UserError
from rlhf.core.processes import free_port
from tests.conftest import BIN, TINY, make_project
from tests.faults import start
from tests.test_storage import client, env, start_moto
from tests.test_study import RUNS as STUDY_RUNS
from tests.test_study import STUDY, rlhf, write_study

SPEC = {**STUDY, "seeds": [0, 1], "rounds": 2, "parallel": 2}
RUNS = ["beta=0.1,seed=0", "beta=0.1,seed=1", "beta=0.5,seed=0", "beta=0.5,seed=1"]


def git(*args, cwd):
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and everything under it, as when its machine dies."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    proc, url = start_moto(tmp_path_factory.mktemp("moto"))
    client(url).create_bucket(Bucket="lab")
    yield url
    proc.kill()


def test_a_pool_study_names_what_the_workers_would_miss_before_anything_starts(tmp_path, monkeypatch, capsys):
    """No remote, no origin, uncommitted or unpushed code, no server the workers reach: each one line."""
    from rlhf.cli import main
    from rlhf.orchestration.pool import resolve
    from rlhf.studies.grid import load_study

    project = make_project(tmp_path / "p", TINY)
    shutil.copy(project / "data" / "sft.jsonl", project / "data" / "sft_small.jsonl")
    monkeypatch.chdir(project)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    study = write_study(project, "lab", {**STUDY, "pool": {"name": "lab-pool"}})

    def error(remote=None):
        spec = {**STUDY, "pool": {"name": "lab-pool", **({"remote": remote} if remote else {})}}
        with pytest.raises(UserError) as e:
            resolve(load_study(write_study(project, "lab", spec)), deploying=True)
        return str(e.value)

    assert error() == f"{study}: pool: remote: none named and the project has no default DVC remote (`rlhf remote`)"
    assert error("s3://lab/rlhf") == f"{study}: pool: source: the project has no git remote origin"
    git("init", "-q", "-b", "main", cwd=project)
    git("remote", "add", "origin", str(tmp_path / "origin.git"), cwd=project)
    git("init", "-q", "--bare", str(tmp_path / "origin.git"), cwd=tmp_path)
    git("add", "rlhf", "tasks", "flows", "params.yaml", "data", cwd=project)
    git("commit", "-qm", "code", cwd=project)
    head = git("rev-parse", "HEAD", cwd=project)[:12]
    assert error("s3://lab/rlhf") == (  # the study file is new: a worker would not find it
        f"{study}: pool: what the runs read has uncommitted changes (studies/lab.yaml); workers clone {head}: "
        "commit and push"
    )
    write_study(project, "lab", {**STUDY, "pool": {"name": "lab-pool", "remote": "s3://lab/rlhf"}})
    git("add", "studies/lab.yaml", cwd=project)
    git("commit", "-qm", "study", cwd=project)
    head = git("rev-parse", "HEAD", cwd=project)[:12]
    assert (
        error("s3://lab/rlhf")
        == f"{study}: pool: commit {head} is not on any remote branch: `git push` it for the workers"
    )
    git("push", "-q", "origin", "main", cwd=project)
    (project / "tasks" / "label.py").write_text((project / "tasks" / "label.py").read_text() + "\n")
    (project / "data" / "sft_small.jsonl").write_text((project / "data" / "sft_small.jsonl").read_text() + "\n")
    assert error("s3://lab/rlhf") == (  # code, and a data file the study's params name
        f"{study}: pool: what the runs read has uncommitted changes (data/sft_small.jsonl, tasks/label.py); "
        f"workers clone {head}: commit and push"
    )
    git("checkout", "tasks/label.py", "data/sft_small.jsonl", cwd=project)
    assert resolve(load_study(study), deploying=True).commit.startswith(head)
    with pytest.raises(SystemExit) as e:
        main(["study", "run", study])
    assert e.value.code == 2  # no server the workers could reach: one line, before anything is deployed
    assert capsys.readouterr().err == (
        "error: no Prefect server for the workers: start one where they reach it (`rlhf server --host 0.0.0.0`) "
        "and set PREFECT_API_URL\n"
    )


def test_a_study_finds_each_runs_flow_run_past_the_first_page_the_server_returns(tmp_path, monkeypatch):
    """A study resubmitted for weeks: each run's newest flow run with its params is found however many newer
    flow runs (other params: an earlier version of the study) the server returns before it."""
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from rlhf.orchestration import pool
    from rlhf.studies.grid import load_study

    project = make_project(tmp_path / "p", TINY)
    monkeypatch.chdir(project)
    study = load_study(write_study(project, "lab", STUDY))
    monkeypatch.setenv("PREFECT_API_DEFAULT_LIMIT", "2")  # the server returns 2 flow runs a read, not 200
    run = study.runs[0]
    with prefect_test_harness(server_startup_timeout=60), get_client(sync_client=True) as c:
        deployment = c.create_deployment(c.create_flow_from_name(pool.FLOW), "lab")
        mine = c.create_flow_run_from_deployment(deployment, name=run.id, parameters={"params": pool.run_params(run)})
        for seed in range(5):
            c.create_flow_run_from_deployment(deployment, name=run.id, parameters={"params": {"seed": seed}})
        found = pool.latest(study)
    assert list(found) == [run.id] and found[run.id].id == mine.id


@pytest.mark.slow  # a server, a deployment and submissions: about half a minute
def test_ctrl_c_while_following_a_pool_stops_following_in_one_line_and_the_runs_go_on(tmp_path, moto, monkeypatch):
    """No worker takes the runs: `rlhf study run --pool` deploys, submits and follows them; Ctrl-C (SIGINT to its
    whole process group) ends it in one line, exit 130, no traceback; the submitted run stays on the server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from rlhf.orchestration import pool
    from rlhf.studies.grid import load_study

    project = make_project(tmp_path / "p", TINY)
    shutil.copy(project / "data" / "sft.jsonl", project / "data" / "sft_small.jsonl")
    where = {"name": "idle", "remote": "s3://lab/idle", "endpoint_url": moto, "source": str(project)}
    study = write_study(project, "idle", {**STUDY, "pool": where})
    monkeypatch.chdir(project)  # the study's base params.yaml is the project's
    with prefect_test_harness(server_startup_timeout=60), get_client(sync_client=True) as c:
        e = env(tmp_path, PREFECT_API_URL=str(c.api_url).rstrip("/"))
        subprocess.run([BIN / "prefect", "work-pool", "create", "idle", "--type", "process"], env=e, check=True)
        with open(tmp_path / "study.log", "w") as log:
            proc = start(project, "study", "run", study, env=e, stderr=log)  # as a terminal starts it
            deadline = time.monotonic() + 120
            with temporary_settings({PREFECT_API_URL: e["PREFECT_API_URL"]}):
                studied = load_study(study)
                while not pool.latest(studied):  # the first run submitted (the other waits for its `prepare`)
                    assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "study.log").read_text()
                    time.sleep(0.5)
                os.killpg(proc.pid, signal.SIGINT)
                code = proc.wait(timeout=60)
                states = {run: fr.state.type.name for run, fr in pool.latest(studied).items()}
    out = (tmp_path / "study.log").read_text()
    assert code == 130 and "Traceback" not in out, out[-3000:]
    assert out.splitlines()[-1] == (
        f"interrupted (SIGINT): the runs on work pool 'idle' go on; `rlhf study status {study} --pool idle` "
        "shows them, `rlhf study run` again follows them to the report"
    )
    assert states == {"beta=0.1,seed=0": "SCHEDULED"}


def test_the_followers_state_machine_against_a_real_server(tmp_path, moto, monkeypatch):
    """`rlhf study run --pool`'s polls, driven one at a time against a real Prefect server (no worker: the test
    sets the flow runs' states as workers and machines would): the runs sharing a seed wait for the first one's
    prepare on the remote; a second follower submits nothing twice; a crashed run is submitted again once; the
    server itself (the study's automation) marks Crashed a running run that sends no heartbeat and a pending one
    that never starts, with nobody polling meanwhile; a cancelled or failed run ends with its message; the
    follower ends when no run is on its way."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Completed, Crashed, Failed, Pending, Running
    from prefect.testing.utilities import prefect_test_harness

    from rlhf.orchestration import pool
    from rlhf.studies.grid import load_study

    for key, value in env(tmp_path).items():
        monkeypatch.setenv(key, value)
    project = make_project(tmp_path / "p", TINY)
    monkeypatch.chdir(project)
    study = load_study(write_study(project, "sm", {**STUDY, "seeds": [0, 1]}))
    where = pool.Pool(name="lab-pool", remote="s3://lab/sm", endpoint_url=moto, source=str(project), commit=None)
    said: list[str] = []
    with prefect_test_harness(server_startup_timeout=60), get_client(sync_client=True) as c:
        deployed = c.create_deployment(c.create_flow_from_name(pool.FLOW), "sm")  # as deploy() makes it, no pool
        ids = []
        for silence in (60, 10, 10):  # one automation per study: a changed one replaced, the same one kept
            pool.watch_for_dead_runs(study, deployed, silence)
            (automation,) = c.read_automations_by_name(f"{pool.FLOW}/sm: silent runs crashed")
            ids.append((automation.id, automation.trigger.within.total_seconds()))
        assert ids[0][0] != ids[1][0] and ids[1] == ids[2] and ids[2][1] == 10
        one, two = pool.Follower(study, where, said.append), pool.Follower(study, where, said.append)

        def flow_runs() -> dict[str, list]:
            out: dict[str, list] = {}
            for fr in sorted(c.read_flow_runs(), key=lambda fr: fr.created):
                out.setdefault(fr.name, []).append(fr)
            return out

        assert one.poll() is None and two.poll() is None
        assert {name: len(frs) for name, frs in flow_runs().items()} == {RUNS[0]: 1, RUNS[1]: 1}  # one per seed
        client(moto).put_object(Bucket="lab", Key=f"sm/studies/sm/{RUNS[0]}/dvc.lock", Body=b"stages:\n  prepare:\n")
        assert two.poll() is None and one.poll() is None  # seed 0's prepare is on the remote: its other run goes
        assert {name: len(frs) for name, frs in flow_runs().items()} == {RUNS[0]: 1, RUNS[1]: 1, RUNS[2]: 1}

        c.set_flow_run_state(flow_runs()[RUNS[0]][0].id, Crashed(message="worker gone"), force=True)
        assert one.poll() is None and two.poll() is None
        assert len(flow_runs()[RUNS[0]]) == 2 and said.count(f"{RUNS[0]}: crashed (worker gone); submitted again") == 1
        c.set_flow_run_state(flow_runs()[RUNS[1]][0].id, Running(), force=True)  # then its machine dies
        c.set_flow_run_state(flow_runs()[RUNS[2]][0].id, Pending(), force=True)  # dies while cloning
        deadline = time.monotonic() + 60
        while {flow_runs()[r][0].state.type.name for r in RUNS[1:3]} != {"CRASHED"}:
            assert time.monotonic() < deadline, {r: flow_runs()[r][0].state for r in RUNS[1:3]}
            time.sleep(1)
        assert flow_runs()[RUNS[1]][0].state.message == "silent for 10 s: its worker stopped"
        assert one.poll() is None  # submitted again
        assert len(flow_runs()[RUNS[1]]) == len(flow_runs()[RUNS[2]]) == 2

        client(moto).put_object(Bucket="lab", Key=f"sm/studies/sm/{RUNS[1]}/dvc.lock", Body=b"stages:\n  prepare:\n")
        assert one.poll() is None  # seed 1's other run
        latest = {name: frs[-1] for name, frs in flow_runs().items()}
        assert sorted(latest) == sorted(RUNS)
        c.set_flow_run_state(latest[RUNS[0]].id, Completed(), force=True)
        c.set_flow_run_state(latest[RUNS[1]].id, Completed(), force=True)
        c.set_flow_run_state(latest[RUNS[2]].id, Cancelled(message="cancelled from the UI"), force=True)
        c.set_flow_run_state(latest[RUNS[3]].id, Failed(message="stage train_rm@r01 failed: bad"), force=True)
        failures = one.poll()
    assert failures == [f"{RUNS[2]}: cancelled from the UI", f"{RUNS[3]}: stage train_rm@r01 failed: bad"]


def test_the_report_reads_each_runs_metrics_from_the_remote_without_dvc_and_once(tmp_path, moto, monkeypatch):
    """`report --pool` mirrors each run's record and metrics from the remote: one S3 client, the metrics.json
    objects found by the md5 dvc.lock names (DVC's remote layout), and on the next report only the records read
    again and the metrics of a new round, not every run's every round."""
    import hashlib

    import yaml

    from rlhf.orchestration import pool
    from rlhf.studies.grid import load_study

    for key, value in env(tmp_path).items():
        monkeypatch.setenv(key, value)
    project = make_project(tmp_path / "p", TINY)
    monkeypatch.chdir(project)
    study = load_study(write_study(project, "rec", STUDY))
    where = pool.Pool(name="lab-pool", remote="s3://lab/rec", endpoint_url=moto, source=str(project), commit=None)
    s3 = client(moto)

    def record(run: str, rounds: dict[str, bytes]) -> None:
        stages = {}
        for rnd, text in rounds.items():
            md5 = hashlib.md5(text).hexdigest()
            s3.put_object(Bucket="lab", Key=f"rec/files/md5/{md5[:2]}/{md5[2:]}", Body=text)
            out = {"path": f"data/rounds/{rnd}/metrics.json", "hash": "md5", "md5": md5, "size": len(text)}
            stages["prepare" if rnd == "r00" else f"evaluate@{rnd}"] = {"cmd": "rlhf evaluate", "outs": [out]}
        for name, text in (("params.yaml", "rounds: {r01: r00}\n"), ("dvc.yaml", "stages: {}\n")):
            s3.put_object(Bucket="lab", Key=f"rec/studies/rec/{run}/{name}", Body=text.encode())
        lock = yaml.safe_dump({"schema": "2.0", "stages": stages}).encode()
        s3.put_object(Bucket="lab", Key=f"rec/studies/rec/{run}/dvc.lock", Body=lock)

    metrics = {run: {"r00": f'{{"run": "{run}", "round": 0}}'.encode()} for run in STUDY_RUNS}
    for run in STUDY_RUNS:
        record(run, metrics[run])
    reads = []
    pool._client(moto).meta.events.register(
        "provide-client-params.s3.GetObject", lambda **kw: reads.append(kw["params"]["Key"])
    )
    assert pool.mirror(study, where) == 2
    for run in STUDY_RUNS:
        assert (study.folder / run / "data/rounds/r00/metrics.json").read_bytes() == metrics[run]["r00"]
        assert (study.folder / run / "dvc.lock").is_file() and not (study.folder / run / ".dvc").exists()
    assert len(reads) == 2 * (len(pool.RECORD) + 1)  # each run: its record's files and r00's metrics
    metrics[STUDY_RUNS[0]]["r01"] = b'{"round": 1}'
    record(STUDY_RUNS[0], metrics[STUDY_RUNS[0]])
    reads.clear()
    assert pool.mirror(study, where) == 2
    assert (study.folder / STUDY_RUNS[0] / "data/rounds/r01/metrics.json").read_bytes() == b'{"round": 1}'
    assert (
        len(reads) == 2 * len(pool.RECORD) + 1 and sum("/files/md5/" in key for key in reads) == 1
    )  # the new round's alone


def test_a_run_checks_out_the_commit_it_was_submitted_with_in_a_clone_of_a_newer_one(tmp_path):
    """The deployment moved on to a newer commit after the run was submitted: the worker's clone (as Prefect's
    pull step makes it, shallow, at the deployment's commit) is put at the run's own commit."""
    from rlhf.core.errors import UserError
    from rlhf.orchestration.pool import check_out

    origin, work = tmp_path / "origin.git", tmp_path / "work"
    git("init", "-q", "--bare", str(origin), cwd=tmp_path)
    git("clone", "-q", str(origin), str(work), cwd=tmp_path)
    for text in ("old", "new"):
        (work / "code.py").write_text(text)
        git("add", "code.py", cwd=work)
        git("commit", "-qm", text, cwd=work)
    git("push", "-q", "origin", "HEAD", cwd=work)
    old = git("rev-parse", "HEAD~1", cwd=work).strip()
    clone = tmp_path / "clone"
    git("clone", "-q", "--depth", "1", f"file://{origin}", str(clone), cwd=tmp_path)
    check_out(old, clone)
    assert (clone / "code.py").read_text() == "old" and git("rev-parse", "HEAD", cwd=clone).strip() == old
    with pytest.raises(UserError, match=r"^commit 0123456789ab: git fetch failed in the worker's clone: "):
        check_out("0123456789ab" * 3 + "0123", clone)


def test_the_report_names_the_commit_the_runs_ran_and_warns_when_they_differ(tmp_path, monkeypatch):
    from rlhf.studies.grid import load_study
    from rlhf.studies.report import commits_line

    project = make_project(tmp_path / "p", TINY)
    monkeypatch.chdir(project)
    study = load_study(write_study(project, "c", STUDY))
    assert commits_line(study) == []  # a local study's runs have no record of a commit
    for run in study.runs:
        run.folder.mkdir(parents=True)
        (run.folder / "commit").write_text("a" * 40 + "\n")
    assert commits_line(study) == [f"Every run with a record ran commit {'a' * 12}.", ""]
    (study.runs[1].folder / "commit").write_text("b" * 40 + "\n")
    assert commits_line(study)[0] == (
        f"⚠ The runs ran different commits: {'a' * 12} (1 run), {'b' * 12} (1 run); rows from different code may "
        "not compare."
    )


@pytest.mark.slow  # a server, two followers and their submissions: about a minute
def test_two_followers_started_at_once_submit_each_run_once(tmp_path, moto, monkeypatch):
    """Two laptops follow one pool study (`rlhf study run --pool` in two checkouts, started together, no worker
    yet): each run the study submits is one flow run on the server, not one per follower (the submissions'
    idempotency keys)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from rlhf.orchestration import pool
    from rlhf.studies.grid import load_study

    project = make_project(tmp_path / "p", TINY)
    shutil.copy(project / "data" / "sft.jsonl", project / "data" / "sft_small.jsonl")
    where = {"name": "twice", "remote": "s3://lab/twice", "endpoint_url": moto, "source": str(project)}
    study = write_study(project, "twice", {**STUDY, "seeds": [0, 1], "pool": where})
    monkeypatch.chdir(project)
    with prefect_test_harness(server_startup_timeout=60), get_client(sync_client=True) as c:
        e = env(tmp_path, PREFECT_API_URL=str(c.api_url).rstrip("/"))
        subprocess.run([BIN / "prefect", "work-pool", "create", "twice", "--type", "process"], env=e, check=True)
        laptops = [project, shutil.copytree(project, tmp_path / "laptop2", symlinks=True)]  # a checkout each
        logs = [tmp_path / f"follower{i}.log" for i in (1, 2)]
        procs = [start(p, "study", "run", study, env=e, stderr=log.open("w")) for p, log in zip(laptops, logs)]
        deadline = time.monotonic() + 120
        with temporary_settings({PREFECT_API_URL: e["PREFECT_API_URL"]}):
            studied = load_study(study)
            while len(pool.latest(studied)) < 2:  # one run per seed (the others wait for their seed's prepare)
                assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs[0].read_text()
                time.sleep(0.5)
            time.sleep(12)  # two more polls of each follower
            for proc in procs:
                os.killpg(proc.pid, signal.SIGINT)
            assert [proc.wait(timeout=60) for proc in procs] == [130, 130]
            flow_runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["study:twice"])))
    names = sorted(fr.name for fr in flow_runs)
    assert names == ["beta=0.1,seed=0", "beta=0.1,seed=1"], [names, *(log.read_text()[-2000:] for log in logs)]


@pytest.mark.slow
def test_a_study_on_two_workers_survives_one_dying_and_reports_as_a_local_one(project, moto, tmp_path):
    e = env(tmp_path)
    # The project as a lab keeps it: a git repository with an origin the workers clone, and an S3 remote.
    origin = tmp_path / "origin.git"
    git("init", "-q", "--bare", "-b", "main", str(origin), cwd=tmp_path)
    study = write_study(project, "pool", {**SPEC, "pool": {"name": "lab-pool", "silence": 60}})
    write_study(project, "here", SPEC)
    (project / ".gitignore").write_text("studies/*/\ndata/rounds/\n.prefect/\n/dvc.lock\n")
    git("init", "-q", "-b", "main", cwd=project)
    git("remote", "add", "origin", str(origin), cwd=project)
    out = subprocess.run(
        [BIN / "rlhf", "remote", "s3://lab/rlhf", "--endpoint-url", moto],
        cwd=project,
        env=e,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    git("add", "-A", cwd=project)
    git("commit", "-qm", "the project", cwd=project)
    git("push", "-q", "origin", "main", cwd=project)

    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []
    try:
        server = subprocess.Popen(
            [BIN / "rlhf", "server", "--port", str(free_port())],
            cwd=project,
            stdout=(logs / "server.log").open("w"),
            stderr=subprocess.STDOUT,
            env=e,
        )
        procs.append(server)
        record = project / ".prefect" / "server.json"
        deadline = time.monotonic() + 120
        while not record.exists():
            assert server.poll() is None and time.monotonic() < deadline, (logs / "server.log").read_text()
            time.sleep(0.5)
        e["PREFECT_API_URL"] = json.loads(record.read_text())["api_url"]
        subprocess.run(
            [BIN / "prefect", "work-pool", "create", "lab-pool", "--type", "process"],
            env=e,
            check=True,
            capture_output=True,
        )
        workers = {}
        for name in ("w1", "w2"):  # each in a folder of its own, as on two machines; one run at a time each
            (tmp_path / name).mkdir()
            workers[name] = subprocess.Popen(
                [BIN / "prefect", "worker", "start", "--pool", "lab-pool", "--limit", "1", "--name", name],
                cwd=tmp_path / name,
                stdout=(logs / f"{name}.log").open("w"),
                stderr=subprocess.STDOUT,
                env={**e, "PREFECT_WORKER_QUERY_SECONDS": "2", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
            procs.append(workers[name])
        runner = subprocess.Popen(
            [BIN / "rlhf", "study", "run", study],
            cwd=project,
            env=e,
            stdout=(logs / "study.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(runner)

        # Kill w1 once a run of its own has pushed round 1 and is into round 2.
        deadline = time.monotonic() + 900
        while not (victim := _pushed_r01(logs / "w1.log")):
            assert runner.poll() is None and time.monotonic() < deadline, _tail(logs)
            time.sleep(1)
        kill_tree(workers["w1"])
        runner.wait(timeout=1500)
        study_log = (logs / "study.log").read_text()
        assert runner.returncode == 0, _tail(logs)
        _same_study_here_and_from_a_clone(project, tmp_path, study, e, origin)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()

    w1, w2 = ((logs / f"{n}.log").read_text() for n in ("w1", "w2"))
    for name, text in (("w1", w1), ("w2", w2)):
        assert "submitting flow run" in text, f"{name} ran no run"
    assert f"{victim}: crashed (silent for 60 s: its worker stopped)" in study_log and "submitted again" in study_log
    # The run finished on w2 after the rounds it had pushed were restored, not recomputed.
    resumed = [line for line in w2.splitlines() if f"Flow run '{victim}'" in line]
    assert any("Stage 'evaluate@r01' is cached" in line for line in resumed), "\n".join(resumed[-40:])
    assert any("evaluate@r01: restored from the remote's run-cache (" in line for line in resumed)
    assert any("Running stage 'generate@r02'" in line for line in resumed)
    # prepare ran once per seed in the whole study, every other run restored it from the remote
    assert (w1 + w2).count("Running stage 'prepare'") == 2


def _same_study_here_and_from_a_clone(project, tmp_path, study, e, origin) -> None:
    """The same study on this machine, then status and report from a clone that never saw a worker's disk."""
    out = rlhf("study", "run", "studies/here.yaml", cwd=project, env=e)
    assert out.returncode == 0, out.stderr[-3000:]
    here = _table(out.stdout + out.stderr)  # the flow logs its table
    elsewhere = tmp_path / "elsewhere"
    git("clone", "-q", str(origin), str(elsewhere), cwd=tmp_path)
    shutil.copy(project / study, elsewhere / study)
    status = rlhf("study", "status", study, cwd=elsewhere, env=e)
    assert status.returncode == 0, status.stderr
    assert "4 done" in status.stdout and all(re.search(rf"{re.escape(r)}\s+done\s+2/2", status.stdout) for r in RUNS)
    report = rlhf("study", "report", study, cwd=elsewhere, env=e)
    assert report.returncode == 0, report.stderr
    assert _table(report.stdout) == here
    assert (elsewhere / "studies/pool/report/report.md").is_file()


def _pushed_r01(log) -> str | None:
    """The run on this worker whose round 1 is pushed, or None."""
    m = re.search(r"Flow run '([^']+)' - .*r01 pushed: ", log.read_text() if log.exists() else "")
    return m and m[1]


def _table(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| rank")]


def _tail(logs) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("pool") / "project", TINY)
    sft = (project / "data" / "sft.jsonl").read_text().splitlines(keepends=True)
    (project / "data" / "sft_small.jsonl").write_text("".join(sft[:600]))  # STUDY's cheaper prepare
    return project
