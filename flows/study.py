"""The study flow: every run of a study grid that has not finished, each by `rlhf run` in its own workspace.

One task run per run, named by its run-id, at most `parallel` at once; each runs `rlhf run` in a
subprocess inside the run's DVC project (so DVC skips whatever that run already finished), reporting to
the same Prefect server, its output lines becoming the task's log lines (and the run's `run.log`). Each
run's state is written atomically (done, or failed with its one-line message), so a killed study, run
again, finishes only what is missing. The flow ends with the study report and its table as an artifact.
A normal flow taking the study path, so it can be served on a schedule like the single-run flow.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.states import Failed

from rlhf.core.errors import StageFailed
from rlhf.core.io import remove_scratch
from rlhf.core.processes import dying_with_parent, relay
from rlhf.orchestration import interrupts
from rlhf.orchestration.preflight import check_study
from rlhf.orchestration.storage import configure_remote
from rlhf.studies.grid import Run, Study, load_study, prepare_workspace, run_status, study_lock, write_state
from rlhf.studies.report import axis_names, final_rows, markdown_table, write_report

# `rlhf run` as a process that dies with this one, taking its stages with it (rlhf/core/processes.py).
RUN = dying_with_parent("rlhf", "run")
# The runs' `rlhf run` processes now, each until its state is written. Each starts in a session of its own, so a
# terminal's Ctrl-C reaches the study alone, which passes it on to each run (stop_runs): each stops its stage
# and says where it resumes, as `rlhf run` does on its own (rlhf/orchestration/interrupts.py).
_RUNNING: dict[subprocess.Popen, str] = {}
# Set by stop_runs: no run starts its `rlhf run` after it. A run is started and put in _RUNNING under _LOCK, which
# stop_runs takes to set it, so a run still in prepare_workspace when the signal came never starts: started after
# stop_runs had passed the signal on, nothing would stop it and the flow would wait on it until a second Ctrl-C.
_STOPPING = threading.Event()
_LOCK = threading.Lock()
_CHILD_PREFIX = re.compile(r"^\d\d:\d\d:\d\d \w+ [\w.]+: ")  # the child's own "time level logger: "


class StudyFailed(StageFailed):
    pass


@task(task_run_name="{run_id}", cache_policy=NO_CACHE)
def run_one(study_path: str, run_id: str, api_url: str) -> str:
    """Run one configuration x seed to its last round; returns its final line, or fails with its error."""
    study = load_study(study_path)
    run = next(r for r in study.runs if r.id == run_id)
    prepare_workspace(run, study.cache)
    return run_in_workspace(run, run_env(study.spec.parallel, api_url))


def run_in_workspace(run: Run, env: dict[str, str], on_line=None) -> str:
    """`rlhf run` in the run's workspace, its lines logged (and kept in run.log, and passed to `on_line`); the
    run's state written when it ends. Its final line, or a Failed state with the run's one-line error."""
    log = get_run_logger()
    started = time.time()
    write_state(run, "running", started=started)
    with open(run.folder / "run.log", "a", buffering=1) as record:  # by line: `tail -f run.log` follows the run
        if (proc := _start(run, env)) is None:
            name = signal.Signals(interrupts.signalled() or signal.SIGINT).name
            message = f"interrupted ({name}) before `rlhf run` started"
            write_state(run, "interrupted", message, started)
            return Failed(message=f"{run.id}: {message}", data=StudyFailed(f"{run.id}: {message}"))
        with proc:

            def lines():
                for line in proc.stdout:
                    record.write(line)
                    yield _CHILD_PREFIX.sub("", line)

            def show(line: str) -> None:
                log.info(f"[{run.id}] {line}")  # the run's lines, for a console where several interleave
                if on_line:
                    on_line(line)

            try:
                tail = relay(lines(), show, keep=1)
                proc.wait()
                last = (tail[-1] if tail else "").removeprefix("error: ")
                message = last or f"rlhf run exited with status {proc.returncode}"
                state = "done" if proc.returncode == 0 else "interrupted" if interrupts.signalled() else "failed"
                write_state(run, state, None if state == "done" else message, started)
            finally:
                _RUNNING.pop(proc, None)
    if state != "done":
        return Failed(message=f"{run.id}: {message}", data=StudyFailed(f"{run.id}: {message}"))
    return f"done in {time.time() - started:.0f} s"


def _start(run: Run, env: dict[str, str]) -> subprocess.Popen | None:
    """The run's `rlhf run`, started and in _RUNNING; None once stop_runs has begun (_STOPPING)."""
    with _LOCK:
        if _STOPPING.is_set():
            return None
        proc = subprocess.Popen(
            RUN,
            cwd=run.folder,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _RUNNING[proc] = run.id
        return proc


@contextlib.contextmanager
def _stopping_runs_when_signalled():
    """A signal stopping the study (`rlhf study run` is interruptible) stops its runs before the flow ends: the
    flow's task runner waits for its task runs, each waiting for its `rlhf run`."""
    try:
        yield
    except BaseException:
        if signum := interrupts.signalled():
            stop_runs(signum)
        raise


def stop_runs(signum: int, timeout: float = 120) -> None:
    """Pass the signal that is stopping the study on to each run in flight, and wait (at most `timeout` s) until
    each has stopped and its state says so; then whatever is left is killed. No run starts after it begins."""
    with _LOCK:
        _STOPPING.set()
    for proc in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
    deadline = time.monotonic() + timeout
    while _RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in list(_RUNNING):
        interrupts.stop_group(proc)


def run_env(parallel: int, api_url: str) -> dict[str, str]:
    """The environment of one run's `rlhf run`: this one's, reporting to `api_url`. With runs side by side,
    each step's OpenMP threads sleep while they wait (unless the user says otherwise): spinning threads of
    two steps on the same cores starve each other (bench/parallel_runs.py: two generate steps at once on 2
    cores took 16x longer spinning than sleeping). The wait policy changes no result, only the waiting."""
    env = {**os.environ, "PREFECT_API_URL": api_url}
    if parallel > 1:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


@flow(name="rlhf-study", flow_run_name="{path}", log_prints=True)
def study(path: str, pool: str | None = None) -> list[dict]:
    """Run every configuration x seed of the study file at `path` that has not finished, then report. On a work
    pool (`pool`, or the study's `pool:`): each run a flow run there (rlhf/orchestration/pool.py)."""
    from prefect.client.orchestration import get_client

    s = load_study(path)
    check_study(s)
    with study_lock(s):
        if pool or s.spec.pool:
            from rlhf.orchestration import pool as pools

            where = pools.resolve(s, pool, deploying=True)
            print(s.describe().replace(" at a time", " at a time on the pool"))
            log = get_run_logger()
            failed, todo = pools.run_all(s, where, say=log.info), s.runs
            log.info(f"records of {pools.mirror(s, where)} runs pulled from {where.remote}")
        else:
            remove_scratch(s.folder)  # a workspace whose creation was killed half-way
            todo = [r for r in s.runs if run_status(s, r, active=False)[0] != "done"]
            print(f"{s.describe()}: {len(s.runs) - len(todo)} done, {len(todo)} to run")
            with get_client(sync_client=True) as client:  # the runs report to this flow's Prefect server
                api_url = str(client.api_url).rstrip("/")
            failed = _run_bounded(s, [r.id for r in todo], api_url)
    rows = final_rows(s)
    create_table_artifact(
        key=_artifact_key(s), table=rows, description=f"Study {s.folder.name}: final round, ranked by gold"
    )
    print(f"final round, ranked by gold:\n{markdown_table(rows, axis_names(s))}\nreport: {write_report(s)}")
    if failed:
        message = f"{len(failed)} of {len(todo)} runs failed, first {failed[0]} (see `rlhf study status {path}`)"
        return Failed(message=message, data=StudyFailed(message))
    return rows


@flow(name="rlhf-study-run", flow_run_name="{run_id}", log_prints=True)
def study_run(
    study: str, run_id: str, params: dict, remote: str, endpoint_url: str | None = None, commit: str | None = None
) -> str:
    """One run of a study on a work pool's worker (rlhf/orchestration/pool.py). The deployment's pull step put
    the project's code in the working directory, at the run's own `commit` once checked out: the run's workspace
    is made from it and `params`; every stage any run already pushed is restored from `remote` rather than
    computed; each round is pushed as it completes, and the run's record (params, dvc.lock, commit) kept beside
    the remote, where the study's report finds it."""
    from rlhf.orchestration import pool

    run = Run(run_id, "", {}, params["runtime"]["seed"], params, Path("studies", study, run_id))
    if commit:
        pool.check_out(commit, Path.cwd())
    prepare_workspace(run, cache=None)
    if commit:
        (run.folder / "commit").write_text(commit + "\n")
    configure_remote(remote, endpoint_url, cwd=run.folder)

    def record(line: str) -> None:
        if re.match(r"r\d\d pushed: ", line):
            pool.save_record(run, study, remote, endpoint_url)

    # PYTHONPATH: the run's steps import the code that was cloned, which its stages list as their deps
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    result = run_in_workspace(run, env, on_line=record)
    pool.save_record(run, study, remote, endpoint_url)
    return result


def _run_bounded(s: Study, run_ids: list[str], api_url: str) -> list[str]:
    """Submit the runs, keeping at most `parallel` in flight; returns the failures' messages, in grid order."""
    log = get_run_logger()
    pending, running, failed = list(run_ids), {}, {}
    _STOPPING.clear()  # a study stopped earlier in this same process stops none of these runs
    with _stopping_runs_when_signalled():
        while pending or running:
            while pending and len(running) < s.spec.parallel:
                run_id = pending.pop(0)
                running[run_one.submit(str(s.path), run_id, api_url)] = run_id
            future = next(as_completed(list(running)))
            future.wait()  # takes its final state from the task's own return, not a read of the API
            run_id, state = running.pop(future), future.state
            n = len(run_ids) - len(pending) - len(running)
            if state.is_failed():
                failed[run_id] = state.message
                log.error(f"[{n}/{len(run_ids)}] failed: {state.message}")
            else:
                log.info(f"[{n}/{len(run_ids)}] {run_id}: {future.result()}")
    return [failed[r] for r in run_ids if r in failed]


def _artifact_key(s: Study) -> str:
    return "study-" + re.sub(r"[^a-z0-9-]+", "-", s.folder.name.lower()).strip("-")
