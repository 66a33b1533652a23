"""The iteration flow: prepare, then each round's five steps, each run as its DVC stage.

Each step is one Prefect task run named `<round>-<step>` (e.g. `r02-train_rm`) that runs
`dvc repro --single-item <step>@<round>` in its own process: DVC decides what is up to date (a rerun
skips finished stages, so a crashed flow resumes), records every round in dvc.lock, and the step's
process frees its memory before the next one loads its models. That process is forked from one that has
imported the ML libraries already (rlhf/orchestration/preload.py), so a step does not pay their import. The step's
output lines become the task's log lines in Prefect.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed

from rlhf.core.config import load_config, round_index, round_name
from rlhf.core.errors import StageFailed, UserError
from rlhf.core.io import disk_bytes, read_jsonl
from rlhf.core.paths import ROUND_STEPS, round_paths, step_files
from rlhf.core.processes import RUN_PID, dying_with_parent, error_line, relay
from rlhf.core.rounds import extend_rounds, last_completed
from rlhf.evaluation.report import flat, metrics_rows, metrics_table, round_markdown, write_report
from rlhf.orchestration import interrupts, stages
from rlhf.orchestration.lock import project_lock
from rlhf.orchestration.preload import preloaded
from rlhf.orchestration.storage import FEW_RETRIES


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a task that returns a Failed state with exc_info but no exception, which prints a stray
    "NoneType: None" under the one-line failure; drop the empty exc_info."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


logging.getLogger("prefect.task_runs").addFilter(_NoEmptyTraceback())


def target(step: str, rnd: str) -> str:
    return "prepare" if step == "prepare" else f"{step}@{rnd}"


def stage_env() -> dict[str, str]:
    """The environment of a stage's command; the stage command `rlhf ...` must resolve to this
    environment's console script."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONHASHSEED": "0",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        RUN_PID: str(os.getpid()),
    }


@task(task_run_name="{rnd}-{step}")
def stage(step: str, rnd: str, force: bool = False, pull: bool = False) -> bool:
    """Run one step as its DVC stage; returns False when DVC found it up to date and skipped it. `pull`
    (storage.pull): a stage the remote's run-cache holds is downloaded, not computed."""
    log = get_run_logger()
    name = target(step, rnd)
    # dvc dies with this process (rlhf/core/processes.py): a killed run leaves no stage behind to race the next one
    cmd = dying_with_parent(
        "dvc", "repro", "--single-item", name, *(["--force"] if force else []), *(["--pull"] if pull else [])
    )
    env = stage_env()
    if pull:
        env |= FEW_RETRIES
    # A session of its own: Ctrl-C reaches this process alone, which stops the stage's whole group on the way out
    # and then reports the interruption (rlhf/orchestration/interrupts.py).
    with subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    ) as proc:
        try:
            tail = relay(proc.stdout, log.info)
            proc.wait()
        except BaseException as e:  # Ctrl-C, SIGTERM, Prefect's own termination: the step stops first
            interrupts.stop_group(proc)
            _interrupted(e, step, rnd)
            raise
    skipped = any("didn't change, skipping" in line for line in tail)
    if pull and proc.returncode == 0 and any("is cached - skipping run" in line for line in tail):
        size = disk_bytes(step_files(step, rnd)) / 2**20
        log.info(f"{name}: restored from the remote's run-cache ({size:,.1f} MiB), not computed")
    _require_server(name, None if proc.returncode == 0 else error_line(tail))
    if proc.returncode != 0:
        # The step's own one-line "error: ..." says most; DVC's "ERROR: failed to reproduce" comes next.
        message = f"stage {name} failed: {error_line(tail)}"
        # DVC removed the stage's outputs before running it: put back the ones dvc.lock records (from the
        # cache), so that a failure never costs a completed round's artifacts.
        subprocess.run([sys.executable, "-m", "dvc", "checkout", "--quiet", name], env=env, capture_output=True)
        return Failed(message=message, data=StageFailed(message))  # a failed task run, no traceback
    if not skipped:
        _relink(step, rnd, env)
    return not skipped


def _relink(step: str, rnd: str, env: dict) -> None:
    """DVC moves a new output into its cache and links it back only when the cache lacks those bytes: an output a
    stage reproduced bit for bit (`rlhf run --force`, a round removed and rerun) stays a second copy of them.
    Link it to the cache as a new one is (cache.type, rlhf/core/paths.py): each model on disk once."""
    from rlhf.orchestration.preflight import links_outputs

    if links_outputs() and any(not f.is_symlink() and f.stat().st_nlink == 1 for f in step_files(step, rnd)):
        cmd = [sys.executable, "-m", "dvc", "checkout", "--relink", "--quiet", target(step, rnd)]
        subprocess.run(cmd, env=env, capture_output=True)


def _interrupted(e: BaseException, step: str, rnd: str, between: bool = False) -> None:
    """The one line for a run stopped by a signal in the middle of a stage, or `between` steps, just before or
    after that stage (in Prefect's own work around a task run; the CLI prints it)."""
    signum = interrupts.signalled() or getattr(e, "signal", None)  # Prefect's TerminationSignal names its signal
    if signum is None:
        return
    name, signame = target(step, rnd), signal.Signals(signum).name
    interrupts.end(
        f"interrupted ({signame}) in round {rnd} between steps (next to {name}); dvc.lock records the stages that "
        "finished, and `rlhf run` resumes at the first one not done"
        if between
        else f"interrupted ({signame}) in round {rnd}, step {step}, which was stopped; the stages before it are "
        f"recorded in dvc.lock, and `rlhf run` resumes at {name}",
        128 + signum,
    )


def _require_server(name: str, failure: str | None) -> None:
    """After a stage: if the Prefect server is gone, end the run here in one line (the stage's outcome is in
    dvc.lock), rather than have Prefect retry the dead API for a minute and fail in tracebacks."""
    from rlhf.orchestration.server import abandon_api, api_url, healthy

    url = api_url()
    if not url or healthy(url):
        return
    abandon_api()
    outcome = f"stage {name} failed: {failure}" if failure else f"{name} finished and is recorded in dvc.lock"
    interrupts.end(
        f"error: the Prefect server at {url} stopped answering; {outcome}; `rlhf run` resumes from there once a server "
        "answers (its own temporary one when none is set)",
        2,
    )
    raise interrupts.ServerGone(url)


def run_name() -> str:
    """A flow run's name says which rounds it runs, e.g. `r01-r03`, or `r04` for a scheduled round."""
    from prefect.runtime import flow_run

    try:
        more = int(flow_run.parameters.get("more") or 0)
        first, last = (last_completed() + 1, last_completed() + more) if more else (1, len(load_config().rounds))
    except Exception:  # a bad params.yaml fails the run itself, with its own message
        return "iterate"
    return round_name(first) if first == last else f"{round_name(first)}-{round_name(last)}"


@flow(name="iterated-rlhf", flow_run_name=run_name, log_prints=True)
def iterate(force: bool = False, more: int = 0) -> list[dict]:
    """Run prepare and every round in params.yaml, or with `more`, prepare and that many rounds past the last
    completed one (adding them to params.yaml); print and return the per-round metrics."""
    # One command per project at a time (a no-op under `rlhf run`, which holds it); SIGTERM stops an `rlhf run`
    # as Ctrl-C does (rlhf/orchestration/interrupts.py).
    with project_lock("a flow run of iterated-rlhf (`rlhf serve`)"), interrupts.reclaimed():
        return _iterate(force, more)


def _iterate(force: bool, more: int) -> list[dict]:
    todo = extend_rounds(more) if more else None
    cfg, changed = stages.refresh()  # every key in params.yaml; the stages of these params and this code
    todo = todo or list(cfg.rounds)
    for line in changed:
        print(line)
    if more:
        print(f"continuing from {round_name(last_completed())}: {', '.join(todo)}")
    at = None  # the stage begun last, for the line of a run stopped outside a running stage
    try:
        with preloaded(stage_env()):  # the steps' processes start with their libraries imported
            for at in [("prepare", "r00"), *((s, r) for r in todo for s in ROUND_STEPS)]:
                step, rnd = at
                state = stage(step, rnd, force, cfg.storage.pull, return_state=True)
                if state.is_failed():
                    return state  # the flow run fails with the stage's message; later stages do not run
                if step in ("prepare", "evaluate"):
                    publish_round(rnd)
                    print(footprint(rnd))
                    if cfg.storage.push:
                        state = push(rnd, cfg.storage.remote, cfg.storage.timeout, return_state=True)
                        if state.is_failed():  # nothing local is lost: the next run skips what is done, pushes again
                            return state
    except BaseException as e:
        if at:  # a signal inside the stage has already said where (the first line wins)
            _interrupted(e, *at, between=True)
        raise
    shown = ["r00", *list(cfg.rounds)[: round_index(todo[-1])]]  # not rounds params names but none has run
    rows = metrics_rows(shown)
    table = metrics_table(rows)
    print("per-round metrics (gold: the judge's score on held-out prompts; KL to the reference)\n" + table)
    create_markdown_artifact(key="rounds", markdown=f"```\n{table}\n```", description="Per-round metrics")
    print(f"report: {write_report(shown)}")
    return rows


def footprint(rnd: str) -> str:
    """A round's disk use and this long-lived process's memory, logged after every round: what a 20-round
    run must not let grow."""
    import psutil

    disk = disk_bytes(f for f in round_paths(rnd).root.rglob("*") if f.is_file())
    rss = psutil.Process().memory_info().rss
    return f"{rnd} done: data/rounds/{rnd} holds {disk / 2**20:.1f} MiB; the flow process uses {rss / 2**20:.0f} MiB"


def publish_round(rnd: str) -> None:
    """The round's metrics as a Prefect table artifact and a markdown summary, shown in the UI."""
    paths = round_paths(rnd)
    metrics = json.loads(paths.metrics.read_text())
    samples = read_jsonl(paths.eval_samples) if paths.eval_samples.is_file() else []
    create_table_artifact(key=f"{rnd}-metrics", table=flat(metrics), description=f"Round {rnd}: metrics.json")
    create_markdown_artifact(
        key=f"{rnd}-summary",
        markdown=round_markdown(metrics, samples),
        description=f"Round {rnd}: summary and held-out samples",
    )


@task(task_run_name="{rnd}-push")
def push(rnd: str, remote: str | None, timeout: float) -> str:
    """storage.push: the round's outputs to the DVC remote as soon as the round completes."""
    from rlhf.orchestration.storage import push_round

    log = get_run_logger()
    try:
        done = push_round(rnd, remote, timeout, say=log.info)
    except UserError as e:
        return Failed(message=str(e), data=StageFailed(str(e)))
    log.info(f"{rnd} pushed: {done}")
    return done
