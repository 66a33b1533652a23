"""A study across machines: each run a flow run of the deployment `rlhf-study-run/<study>` on a Prefect work
pool, the rounds shared through the S3 remote.

Whoever runs `rlhf study run --pool NAME` deploys flows/study.py's `study_run` from the project's code (a git
URL at a commit, or a folder every worker sees), submits every run the server does not already hold as done
or in flight, and follows them: a run whose heartbeats stop (its worker died) is marked Crashed by an
automation on the server and submitted again, and resumes from what the remote holds. A worker needs the
project's environment, the remote's credentials and PREFECT_API_URL, nothing else: `study_run` checks out
the run's commit, makes the run's workspace, restores every stage any run already pushed (`storage.pull`:
DVC's run-cache on the remote), pushes each round as it completes (`storage.push`), and keeps the run's
record (params.yaml, dvc.yaml, dvc.lock, commit) beside the remote under `studies/<study>/<run-id>/`.
Status comes from the server, the report from those records and the metrics.json files they name, so both
work from any checkout of the project with the remote.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import re
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from rlhf.core.errors import UserError
from rlhf.core.s3 import client, s3_errors, split_s3
from rlhf.evaluation.metrics import lookup
from rlhf.orchestration.storage import default_remote
from rlhf.studies.grid import PoolSpec, Run, Study

FLOW = "rlhf-study-run"  # the deployed flow (flows/study.py); a study's deployment is FLOW/<study name>
ENTRYPOINT = "flows/study.py:study_run"
HEARTBEAT = 30  # seconds between a flow run's heartbeats (Prefect's shortest); pool.silence without one: dead
# What the report needs of a run: its metrics' hashes, and the commit it ran (a file `commit`, from a git source)
RECORD = ("params.yaml", "dvc.yaml", "dvc.lock", "commit")
RESUBMITS = 3  # times one `rlhf study run` submits a run again after its worker died
IN_FLIGHT = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")


@dataclass(frozen=True)
class Pool:
    name: str  # the work pool
    remote: str  # s3://bucket/prefix: the DVC remote; runs' records under <remote>/studies/
    endpoint_url: str | None
    source: str  # a git URL, or a folder every worker sees
    commit: str | None  # for a git source


def resolve(study: Study, name: str | None = None, deploying: bool = False) -> Pool:
    """The study's pool from `pool:` and `--pool`, its defaults taken from the project (its default DVC remote,
    its git origin and HEAD); one line naming what is missing. `deploying`: the code the workers will clone
    must be committed and pushed."""
    spec = study.spec.pool or PoolSpec()
    where = f"{study.path}: pool"
    name = name or spec.name
    if not name:
        raise UserError(f"{where}: name: no work pool named (give `pool: {{name: NAME}}` or --pool NAME)")
    remote, endpoint = spec.remote, spec.endpoint_url
    if remote is None:
        if (found := default_remote()) is None:
            raise UserError(f"{where}: remote: none named and the project has no default DVC remote (`rlhf remote`)")
        remote, endpoint = found[0], endpoint or found[1]
    split_s3(remote)
    source, commit = spec.source, spec.commit
    if source is None:
        source = _git("remote", "get-url", "origin", what=f"{where}: source: the project has no git remote origin")
    if deploying and not shared_folder(source) and commit is None:
        commit = _git("rev-parse", "HEAD", what=f"{where}: commit: the project has no commit")
        status = _git("status", "--porcelain", "--", *run_inputs(study), what="")
        changed = [line.split(maxsplit=1)[1] for line in status.splitlines()]  # "XY path", the first X stripped
        if changed:
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            raise UserError(
                f"{where}: what the runs read has uncommitted changes ({shown}); workers clone {commit[:12]}: "
                "commit and push"
            )
        if not _git("branch", "-r", "--contains", commit, what=""):
            raise UserError(f"{where}: commit {commit[:12]} is not on any remote branch: `git push` it for the workers")
    return Pool(name, remote.rstrip("/"), endpoint, source, commit)


def run_inputs(study: Study) -> list[str]:
    """Every path of the project a run reads on a worker: the code, params.yaml, the study file, the data files
    and the python judge's module its params name."""
    from rlhf.core.config import parse_config
    from rlhf.judges import judge_files
    from rlhf.studies.grid import data_files

    found = {"rlhf", "tasks", "flows", "params.yaml", str(study.path)}
    for run in study.runs:
        found.update(data_files(run.params, Path(".")))
        found.update(f for f in judge_files(parse_config(run.params, study.path)) if not Path(f).is_absolute())
    return sorted(found)


def shared_folder(source: str) -> bool:
    """A source that is a checkout of the project on a shared filesystem, not a repository to clone."""
    return Path(source, "flows", "study.py").is_file()


def _git(*args: str, what: str) -> str:
    out = subprocess.run(["git", *args], capture_output=True, text=True)
    if out.returncode and what:
        raise UserError(what)
    return out.stdout.strip()


def run_params(run: Run) -> dict:
    """A run's params on a worker: every stage restored from the remote when any run computed it, and each
    round pushed as it completes (the storage section is no stage's param: no hash changes)."""
    return {**run.params, "storage": {**run.params.get("storage", {}), "push": True, "pull": True, "remote": None}}


def record_uri(remote: str, study: str, run_id: str) -> str:
    return f"{remote}/studies/{study}/{run_id}"


# ---- the server: deployment, submissions, states ------------------------------------------------------


def deploy(study: Study, pool: Pool) -> str:
    """Create (or update) the study's deployment on the pool; its name. At most `parallel` of its runs at once."""
    from prefect import flow
    from prefect.exceptions import ObjectNotFound
    from prefect.runner.storage import GitRepository

    with _server() as c:
        try:
            c.read_work_pool(pool.name)
        except ObjectNotFound:
            raise UserError(
                f"pool: no work pool {pool.name!r} on the Prefect server at {c.api_url}: create it with "
                f"`prefect work-pool create {pool.name} --type process`"
            ) from None
    source = pool.source if shared_folder(pool.source) else GitRepository(url=pool.source, commit_sha=pool.commit)
    deployable = flow.from_source(source=source, entrypoint=ENTRYPOINT)
    with contextlib.redirect_stdout(io.StringIO()):  # its table of deployments: the caller says it in one line
        deployment_id = deployable.deploy(
            name=study.folder.name,
            work_pool_name=pool.name,
            concurrency_limit=study.spec.parallel,
            job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT)}},
            build=False,
            push=False,
            print_next_steps=False,
        )
    watch_for_dead_runs(study, deployment_id, (study.spec.pool or PoolSpec()).silence)
    return f"{FLOW}/{study.folder.name}"


def watch_for_dead_runs(study: Study, deployed, silence: float) -> None:
    """Have the server mark Crashed any flow run of the deployment (its id: `deployed`) that goes `silence`
    seconds without a sign of life — a heartbeat, or for a run still pending (its worker cloning) becoming
    Running — whether or not anybody follows the study: its concurrency slot is freed, and whoever follows
    next submits it again. A Prefect automation (a proactive trigger, as Prefect's "detect zombie flows");
    installed once per study and left as it is when it already says the same (recreating it would forget the
    runs it is timing)."""
    from prefect.automations import AutomationCore
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    alive = {f"prefect.flow-run.{s}" for s in ("heartbeat", "Running", "Completed", "Failed", "Cancelled", "Crashed")}
    wanted = AutomationCore(
        name=f"{FLOW}/{study.folder.name}: silent runs crashed",
        description="rlhf study run --pool: a run whose worker died is marked Crashed (docs/studies.md)",
        trigger=EventTrigger(
            after={f"prefect.flow-run.{s}" for s in ("heartbeat", "Pending", "Running", "Cancelling")},
            expect=alive,
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={
                "prefect.resource.role": "deployment",
                "prefect.resource.id": f"prefect.deployment.{deployed}",
            },
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silence),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"silent for {silence:g} s: its worker stopped")],
    )
    with _server() as c:
        found = c.read_automations_by_name(wanted.name)
        keep = [a for a in found if AutomationCore.model_validate(a.model_dump()) == wanted][:1]
        for a in found:
            if a not in keep:
                c.delete_automation(a.id)
        if not keep:
            c.create_automation(wanted)


def _server():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def latest(study: Study) -> dict[str, object]:
    """run-id -> the newest flow run of the study's deployment with the run's params (not found: absent)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_DEFAULT_LIMIT

    wanted = {r.id: run_params(r) for r in study.runs}
    out: dict[str, object] = {}
    page_size = PREFECT_API_DEFAULT_LIMIT.value()  # the most runs one read returns (the server's, by default)
    with _server() as c:
        # page by page: a study resubmitted over weeks holds more runs than one read returns
        for offset in itertools.count(0, page_size):
            page = c.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW])),
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=list(wanted))),
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[study.folder.name])),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=page_size,
                offset=offset,
            )
            for fr in page:  # newest first
                if fr.name not in out and fr.parameters.get("params") == wanted[fr.name]:
                    out[fr.name] = fr
            if len(page) < page_size or len(out) == len(wanted):
                return out


def submit(study: Study, pool: Pool, run: Run, replaces=None) -> None:
    """A flow run of the study's deployment for `run`, once however many follow the study: its idempotency key
    is the same for every follower that submits this attempt (the run, its params and the flow run it
    `replaces`, None for the first), so the server keeps the first submission and returns it to the others."""
    from prefect.deployments import run_deployment

    attempt = [study.folder.name, run.id, run_params(run), str(replaces.id) if replaces else None]
    run_deployment(
        f"{FLOW}/{study.folder.name}",
        idempotency_key=hashlib.sha256(json.dumps(attempt, sort_keys=True).encode()).hexdigest(),
        parameters={
            "study": study.folder.name,
            "run_id": run.id,
            "params": run_params(run),
            "remote": pool.remote,
            "endpoint_url": pool.endpoint_url,
            "commit": pool.commit,  # the run keeps it when the deployment moves on to a newer commit
        },
        flow_run_name=run.id,
        timeout=0,
        as_subflow=False,
        tags=[f"study:{study.folder.name}"],
    )


def run_all(study: Study, pool: Pool, say, poll: float = 5.0) -> list[str]:
    """Deploy, submit what the server holds neither as done nor in flight, follow the runs to their ends
    (submitting again one whose worker died), and return the failures' messages in grid order."""
    say(f"deployment {deploy(study, pool)} on work pool {pool.name!r}; rounds shared through {pool.remote}")
    follower = Follower(study, pool, say)
    while (failures := follower.poll()) is None:
        time.sleep(poll)
    return failures


class Follower:
    """What one `rlhf study run --pool` knows between polls: what it submitted, and the runs that ended."""

    def __init__(self, study: Study, pool: Pool, say):
        self.study, self.pool, self.say = study, pool, say
        self.submitted: dict[str, int] = {}
        self.seen: set[str] = set()  # runs seen on their way: one that then fails or is cancelled is not resubmitted
        self.ended: dict[str, str] = {}  # run-id -> "" (done) or its failure's message
        self.keys = prepare_keys(study)  # once: a poll costs the same for every run, not for every pair of runs

    def poll(self) -> list[str] | None:
        """One look at the server: submit what should run, note what ended. None while runs are on their way;
        once none is, the failures' messages in grid order."""
        study, submitted, ended = self.study, self.submitted, self.ended
        runs = latest(study)
        waiting = 0
        # on their way: in flight on the server (whoever submitted them: several may follow) or submitted here
        going = {r for r, fr in runs.items() if fr.state.type.name in IN_FLIGHT} | (set(submitted) - set(ended))
        self.seen |= going
        locks: dict[str, str | None] = {}  # the records read this poll, each once
        for run in study.runs:
            fr = runs.get(run.id)
            state, message = (fr.state.type.name, fr.state.message) if fr else (None, None)
            if state in IN_FLIGHT:
                waiting += 1
            elif state == "COMPLETED":
                self._end(run.id, "")
            elif state is None and _prepare_pending(study, self.pool, run, going, self.keys, locks):
                waiting += 1
            elif (state in (None, "CRASHED") or run.id not in self.seen) and (
                submitted.get(run.id, 0) <= RESUBMITS  # a run that failed before this command: once more
            ):
                if fr is not None:
                    self.say(f"{run.id}: {state.lower()} ({message or 'no message'}); submitted again")
                submit(study, self.pool, run, replaces=fr)
                submitted[run.id] = submitted.get(run.id, 0) + 1
                going.add(run.id)
                waiting += 1
            else:
                self._end(run.id, f"{run.id}: {message or state.lower()}")
        return None if waiting else [ended[r.id] for r in study.runs if ended.get(r.id)]

    def _end(self, run_id: str, failure: str) -> None:
        if run_id not in self.ended:
            self.ended[run_id] = failure
            self.say(f"[{len(self.ended)}/{len(self.study.runs)}] {failure or f'{run_id}: done'}")


def prepare_keys(study: Study) -> dict[str, str]:
    """run-id -> what its `prepare` depends on (its params and seed): runs with the same key share it."""
    from tasks import prepare

    return {
        r.id: json.dumps([lookup(r.params, *k.split(".")) for k in prepare.PARAMS], sort_keys=True) for r in study.runs
    }


def _prepare_pending(study: Study, pool: Pool, run: Run, going: set[str], keys: dict, locks: dict) -> bool:
    """Whether a run with the same `prepare` (its params and seed) is on its way but has not pushed it yet: the
    run waits for it, then restores prepare from the remote rather than compute it a second time. `locks`: the
    records read this poll."""
    first = next((o for o in study.runs if o.id in going and keys[o.id] == keys[run.id]), None)
    if first is None or first.id == run.id:
        return False
    uri = f"{record_uri(pool.remote, study.folder.name, first.id)}/dvc.lock"
    if uri not in locks:
        locks[uri] = _read(uri, pool.endpoint_url)
    return not (locks[uri] and "\n  prepare:" in locks[uri])


def status_rows(study: Study, pool: Pool) -> list[tuple[str, str, str, str]]:
    """(run-id, state, rounds done, note) from the server's flow runs and the runs' records on the remote."""
    runs = latest(study)
    rows = []
    for run in study.runs:
        fr = runs.get(run.id)
        state = {None: "not started", "COMPLETED": "done", "PENDING": "scheduled"}.get(
            fr and fr.state.type.name, fr and fr.state.type.name.lower()
        )
        note = (fr.state.message or "") if fr and state in ("failed", "crashed", "cancelled") else ""
        lock = _read(record_uri(pool.remote, study.folder.name, run.id) + "/dvc.lock", pool.endpoint_url)
        done = len(set(re.findall(r"^  evaluate@(r\d\d):", lock or "", re.M)))
        rows.append((run.id, state, f"{done}/{len(study.rounds) - 1}", note))
    return rows


# ---- records on the remote ----------------------------------------------------------------------------


def check_out(commit: str, folder: Path) -> None:
    """The run's own commit in the deployment's clone (`folder`), whatever the deployment's commit is now: a run
    submitted before `rlhf study run --pool` deployed newer code runs the code it was submitted with, and the
    commit is written to the run's record (`folder`/commit)."""
    here = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=folder).stdout.strip()
    if here != commit:
        for args in (["fetch", "--quiet", "origin", commit], ["checkout", "--quiet", "--detach", commit]):
            out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=folder)
            if out.returncode:
                problem = (out.stderr.strip() or "no output").splitlines()[-1]
                raise UserError(f"commit {commit[:12]}: git {args[0]} failed in the worker's clone: {problem}")


def save_record(run: Run, study: str, pool_remote: str, endpoint_url: str | None) -> None:
    """The run's params.yaml, dvc.yaml and dvc.lock beside the remote, where any checkout finds its metrics."""
    uri = record_uri(pool_remote, study, run.id)
    bucket, key = split_s3(uri)
    s3 = _client(endpoint_url)
    with s3_errors(uri, s3):
        for name in RECORD:
            if (run.folder / name).is_file():
                s3.upload_file(str(run.folder / name), bucket, f"{key}/{name}")


@functools.cache
def _client(endpoint_url: str | None):
    """One S3 client per endpoint for this process (boto3's clients are thread-safe): a follower polls for days."""
    return client(endpoint_url)


def _read(uri: str, endpoint_url: str | None) -> str | None:
    """The text of the object at `uri`, or None where there is none."""
    bucket, key = split_s3(uri)
    s3 = _client(endpoint_url)
    try:
        with s3_errors(uri, s3):
            return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except UserError as e:
        if "no such object" in str(e):
            return None
        raise


def mirror(study: Study, pool: Pool) -> int:
    """Each run's record and every round's metrics.json, read from the remote into the run's folder here, so the
    study's report reads them as it reads a local run's. One S3 client and no DVC process: DVC's remote keeps a
    file under files/md5/ by the md5 its dvc.lock records, and a metrics.json already here with that md5 is not
    read again. Returns how many runs have a record."""
    import yaml

    from rlhf.orchestration.verify import md5_file

    have = 0
    for run in study.runs:
        texts = {
            n: _read(f"{record_uri(pool.remote, study.folder.name, run.id)}/{n}", pool.endpoint_url) for n in RECORD
        }
        if not texts["dvc.lock"]:
            continue
        have += 1
        run.folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            if text is not None:
                (run.folder / name).write_text(text)
        stages = yaml.safe_load(texts["dvc.lock"]).get("stages", {})
        for out in (o for stage in stages.values() for o in stage.get("outs", [])):
            path = run.folder / out["path"]
            if path.name != "metrics.json" or (path.is_file() and md5_file(path) == out["md5"]):
                continue
            text = _read(f"{pool.remote}/files/md5/{out['md5'][:2]}/{out['md5'][2:]}", pool.endpoint_url)
            if text is not None:  # a round whose push has not finished: its metrics next time
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    return have
