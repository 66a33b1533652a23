"""Orchestration overhead: one round of the embedded default through `rlhf run` (the Prefect flow, each step
its DVC stage in its own process) against the same step functions called one after another in one process.

Every side starts from a copy of the same project whose round 0 is built and recorded in dvc.lock, and is
timed as a whole command, imports included:
  direct          `python -c` calling generate, label, train_rm, update_policy and evaluate for r01;
  rlhf run        against a running `rlhf server`, as every scheduled or `--more` round runs: the target;
  rlhf run, temp  with no server running, so the run starts (and stops) a temporary one first.
Each flow's task runs are read back from the Prefect server (its own record of their durations), so the
second table says where the difference goes: a step's `dvc repro` and its process (forked from the flow's
preload process, it loads its models again), against the step function alone; the last column is what a
step would spend importing without the preload process. Target: at most 1.25x.
Takes about 6 minutes on 2 CPU cores with --repeats 2 (the first run also builds round 0, a few more).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from _common import BIN, DEFAULT, ROOT, default_project, fresh_project, med, parser, report, table, verdict

from rlhf.core.processes import free_port, stop

TARGET = 1.25
STEPS = ("generate", "label", "train_rm", "update_policy", "evaluate")
DIRECT, SERVED, TEMP = "direct (one process)", "rlhf run (rlhf server running)", "rlhf run (temporary server)"
# The same step functions, in one process; each step's seconds as JSON on the last line.
DIRECT_CODE = """
import ctypes, gc, importlib, json, time
from rlhf.orchestration.preload import quiet_libraries
from rlhf.core.config import load_config
quiet_libraries()
cfg, took = load_config(), {}
for step in STEPS:
    t = time.perf_counter()
    getattr(importlib.import_module(f"tasks.{step}"), step)(cfg, "r01")
    gc.collect()  # a step's models, which a trainer's reference cycles would keep until later,
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # and the memory glibc would keep for this process after them
    took[step] = time.perf_counter() - t
print(json.dumps(took))
""".replace("STEPS", repr(STEPS))


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(repeats=2)
    args = p.parse_args()
    base = args.out / "orchestration"
    template = _template(base / "template", default_project(args.out))
    work = base / "run"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("PREFECT_API_URL", None)
    with _server(base / "server") as api_url:
        cmds = {
            DIRECT: [str(BIN / "python"), "-c", DIRECT_CODE],
            SERVED: [str(BIN / "rlhf"), "run"],
            TEMP: [str(BIN / "rlhf"), "run"],
        }
        envs = {DIRECT: env, SERVED: {**env, "PREFECT_API_URL": api_url}, TEMP: env}
        times: dict[str, list[float]] = {s: [] for s in cmds}
        split: dict[str, list[dict]] = {DIRECT: [], SERVED: []}
        for r in range(args.repeats):  # no warm-up turn: each side is a fresh process, as a user runs it
            for side in list(cmds) if r % 2 == 0 else list(cmds)[::-1]:
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(template, work, symlinks=True)
                t = time.perf_counter()
                out = subprocess.run(cmds[side], cwd=work, env=envs[side], capture_output=True, text=True)
                times[side].append(time.perf_counter() - t)
                if out.returncode:
                    raise SystemExit(f"{side} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
                print(f"  {side}: {times[side][-1]:.1f} s", flush=True)
                if side == DIRECT:
                    split[DIRECT].append(json.loads(out.stdout.splitlines()[-1]))
                elif side == SERVED:
                    split[SERVED].append(task_seconds(api_url))
    ratio, temp_ratio = med(times[SERVED]) / med(times[DIRECT]), med(times[TEMP]) / med(times[DIRECT])
    imports = import_seconds(work, env)
    per_step = []
    for s in STEPS:
        d, f = med([x[s] for x in split[DIRECT]]), med([x[f"r01-{s}"] for x in split[SERVED]])
        per_step.append([s, d, f, f - d, imports[s]])
    tasks = med([sum(x.values()) for x in split[SERVED]])
    text = (
        "orchestration: one round (r01) of the embedded default, round 0 already built\n"
        + table(
            ["side", "median s", "min s", "/ direct"],
            [[k, med(v), min(v), med(v) / med(times[DIRECT])] for k, v in times.items()],
        )
        + "\n\nwhere the time goes (median s; flow: Prefect's task runs, each a `dvc repro` of the step's CLI)\n"
        + table(["step", "direct: function", "flow: task run", "difference", "imports, unpreloaded"], per_step)
        + f"\nflow: task runs {tasks:.1f} s in all (prepare's up-to-date check included); the rest of the "
        f"command (Python, Prefect client, flow run, artifacts, report) {med(times[SERVED]) - tasks:.1f} s"
        + f"\nwith a temporary server: {temp_ratio:.3f}x ({med(times[TEMP]) - med(times[SERVED]):.1f} s to start "
        "and stop it, once per `rlhf run`)"
        + f"\nrlhf run (server running) / direct: {verdict(ratio, TARGET, higher_is_better=False)}"
    )
    report(
        "orchestration",
        args.out,
        text,
        {
            "times": times,
            "split": split,
            "imports": imports,
            "ratio": ratio,
            "temporary_server_ratio": temp_ratio,
            "target": TARGET,
        },
    )


def _template(dest: Path, source: Path) -> Path:
    """A project holding `source`'s round 0, recorded by DVC as if `dvc repro prepare` had built it, with
    the checkout's current code (the flow's steps and the direct side run the same)."""
    if not (dest / "dvc.lock").is_file():
        fresh_project(dest, {**DEFAULT, "rounds": {"r01": "r00"}}, subset=False)
        shutil.copytree(source / "data/rounds/r00", dest / "data/rounds/r00")
    for code in ("rlhf", "tasks", "flows"):
        shutil.rmtree(dest / code)
        shutil.copytree(ROOT / code, dest / code, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([BIN / "dvc", "commit", "--force", "--quiet", "prepare"], cwd=dest, check=True)
    return dest


class _server:
    """`rlhf server` in its own folder for the benchmark's runs; yields its API URL, stops it after."""

    def __init__(self, where: Path):
        self.where = where

    def __enter__(self) -> str:
        shutil.rmtree(self.where, ignore_errors=True)
        self.where.mkdir(parents=True)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
        self.proc = subprocess.Popen(
            [BIN / "rlhf", "server", "--port", str(port)],
            cwd=self.where,
            env=env,
            stdout=(self.where / "server.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        record = self.where / ".prefect" / "server.json"
        while not record.exists():
            if self.proc.poll() is not None:
                raise SystemExit(f"rlhf server failed: {(self.where / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        self.url = json.loads(record.read_text())["api_url"]
        os.environ["PREFECT_API_URL"] = self.url  # this process reads the task runs back from it
        return self.url

    def __exit__(self, *exc) -> None:
        os.environ.pop("PREFECT_API_URL", None)
        stop(self.proc, timeout=30)


def import_seconds(project: Path, env: dict) -> dict[str, float]:
    """The seconds a step's own process spends importing modules when nothing is preloaded (python -X
    importtime, run once more in the flow's finished copy): what the flow's preload process saves each step
    (rlhf/orchestration/preload.py), and the direct side pays once."""
    took = {}
    for step in STEPS:
        out = subprocess.run(
            [str(BIN / "python"), "-X", "importtime", "-m", "rlhf", step, "r01"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        top = re.finditer(r"^import time:\s+\d+ \|\s+(\d+) \| \S", out.stderr, re.M)  # top-level: cumulative
        took[step] = sum(int(m[1]) for m in top) / 1e6
    return took


def task_seconds(api_url: str) -> dict[str, float]:
    """Each task run's seconds in the newest flow run, as the Prefect server recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return {t.name: (t.end_time - t.start_time).total_seconds() for t in tasks if t.end_time and t.start_time}


if __name__ == "__main__":
    main()
