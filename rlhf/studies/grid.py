"""Study grids: one base params file, axes of values to vary, seeds and rounds (a `studies/<name>.yaml`).

Every configuration x seed is its own run in its own small DVC project, `studies/<name>/<run-id>/` (e.g.
`data=concat,init=liti,seed=1`): its full params.yaml, dvc.yaml, the data files its params name, and links
to the project's code, so `dvc repro`, `dvc status` and `dvc metrics show` work inside it and no run ever
touches another's rounds or dvc.lock. The runs share one DVC cache (`studies/<name>/cache`), so a stage
whose inputs another run already computed (prepare for the same seed, say) is restored from DVC's
run-cache instead of recomputed. flows/study.py runs the grid; this module defines it, prepares the
workspaces and keeps each run's state; report.py compares the runs.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from rlhf.core.config import INPUT_FILES, Config, parse_config, read_yaml, round_name
from rlhf.core.defaults import with_defaults
from rlhf.core.errors import UserError
from rlhf.core.io import atomic_dir, write_json, write_text
from rlhf.core.paths import CACHE_LINKS, STEP_OUTPUT, round_paths
from rlhf.evaluation.metrics import lookup

CODE = ("rlhf", "tasks", "flows")  # linked, not copied: a run's code deps are the code that runs
MODELS = (("prepare", "policy"), ("label", "judge", "name"))  # a local model folder is linked too, not copied
STATE = "study-run.json"  # a run's state, beside its params.yaml
RESERVED = {"rounds": "set the study's `rounds:`", "runtime.seed": "list the seeds under `seeds:`"}


class PoolSpec(BaseModel):
    """A study file's `pool:`: its runs as flow runs on a Prefect work pool (docs/studies.md, "Across machines")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None  # the work pool (`rlhf study run --pool NAME` overrides it)
    remote: str | None = None  # s3://bucket/prefix every worker shares; default: the project's default DVC remote
    endpoint_url: str | None = None  # an S3-compatible store's endpoint; default: that remote's endpointurl
    source: str | None = None  # where workers get the code: a git URL (default: origin) or a shared folder
    commit: str | None = None  # the commit a git source is cloned at; default: HEAD (which must be on origin)
    # seconds a run may go without a heartbeat (every 30 s) before the server marks it Crashed; pending: cloning
    silence: float = Field(120, ge=60)


class StudySpec(BaseModel):
    """A study file. `set` has the shape of params.yaml; `axes` maps dotted params keys to lists of values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = "params.yaml"
    set: dict[str, Any] = {}
    axes: dict[str, list[Any]] = {}
    seeds: list[int] = Field([0], min_length=1)
    rounds: int | None = Field(None, gt=0)  # None: the base's rounds
    parallel: int = Field(1, gt=0)  # runs at once
    pool: PoolSpec | None = None  # None: the runs run on this machine


@dataclass
class Run:
    id: str  # e.g. data=concat,init=liti,seed=1: its folder's name and its Prefect task run's
    config: str  # the axis values alone, e.g. data=concat,init=liti
    values: dict[str, Any]  # axis key -> value
    seed: int
    params: dict
    folder: Path


@dataclass
class Study:
    path: Path
    spec: StudySpec
    runs: list[Run]

    @property
    def folder(self) -> Path:
        return self.path.with_suffix("")

    @property
    def cache(self) -> Path:
        return self.folder / "cache"

    @property
    def rounds(self) -> list[str]:
        return ["r00", *self.runs[0].params["rounds"]]

    @property
    def configs(self) -> dict[str, list[Run]]:
        out: dict[str, list[Run]] = {}
        for run in self.runs:
            out.setdefault(run.config, []).append(run)
        return out

    def describe(self) -> str:
        def count(n: int, what: str) -> str:
            return f"{n} {what}{'s' if n != 1 else ''}"

        return (
            f"{self.folder}: {count(len(self.runs), 'run')} ({count(len(self.configs), 'configuration')} x "
            f"{count(len(self.spec.seeds), 'seed')} x {count(len(self.rounds) - 1, 'round')}), "
            f"{self.spec.parallel} at a time"
        )


def load_study(path: str | Path) -> Study:
    """Read a study file and expand its grid; every configuration is validated by the one Config before
    anything runs, so a bad key or value fails here, naming the study file and the key."""
    path = Path(path)
    spec = parse_config(read_yaml(path), path, StudySpec)
    for section, keys in (("set", _dotted(spec.set)), ("axes", spec.axes)):
        for key in keys:
            if key in RESERVED:
                raise UserError(f"{path}: {section}: {key}: not a study axis; {RESERVED[key]}")
    for key, values in spec.axes.items():
        if not values or len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise UserError(f"{path}: axes: {key}: needs a non-empty list of distinct values")
    base = read_yaml(spec.base)
    parse_config(base, spec.base)  # the base's own mistakes name the base file
    common = _merge(base, spec.set)
    if spec.rounds:
        common["rounds"] = {round_name(i): round_name(i - 1) for i in range(1, spec.rounds + 1)}
    parse_config(common, f"{path}: set")
    names = short_names(list(spec.axes))
    runs = []
    for combo in itertools.product(*spec.axes.values()):
        values = dict(zip(spec.axes, combo))
        config = ",".join(f"{names[k]}={label_of(v)}" for k, v in values.items()) or "base"
        cfg = _validate(common, values, path, config)
        for seed in spec.seeds:
            run_id = ",".join(filter(None, [config if spec.axes else "", f"seed={seed}"]))
            full = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"seed": seed})})
            runs.append(Run(run_id, config, values, seed, full.model_dump(mode="json"), path.with_suffix("") / run_id))
    if len({r.id for r in runs}) != len(runs):
        raise UserError(f"{path}: axes: two values of an axis give the same run name; use plainer values")
    return Study(path, spec, runs)


def _validate(common: dict, values: dict, path: Path, config: str) -> Config:
    """A configuration through the one Config. A mistake that one axis value makes on its own names the
    axis key; one that only a combination makes (two values that cannot go together) names the configuration."""
    params = common
    for key, value in values.items():
        params = with_key(params, key, value, f"{path}: axes")
    try:
        return parse_config(params, f"{path}: axes")
    except UserError as e:
        for key, value in values.items():
            try:
                parse_config(with_key(common, key, value, ""), f"{path}: axes")
            except UserError as alone:
                if str(alone) == str(e):
                    raise
        raise UserError(f"{path}: axes: {config}: {str(e).removeprefix(f'{path}: axes: ')}") from None


def _merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for k, v in change.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    return [
        k
        for key, v in tree.items()
        for k in ([f"{prefix}{key}"] + (_dotted(v, f"{prefix}{key}.") if isinstance(v, dict) else []))
    ]


def with_key(params: dict, dotted: str, value, where: str) -> dict:
    """A copy of `params` with `dotted` (e.g. train_rm.data) set to `value`."""
    out = dict(params)
    node, parts = out, dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{where}: {dotted}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node[part] = node = dict(child)
    node[parts[-1]] = value
    return out


def short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key's shortest trailing part that no other key ends with: train_rm.data -> data."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if sum(k == name or k.endswith(f".{name}") for k in keys) == 1:
                break
        names[key] = name
    return names


def label_of(value) -> str:
    """A value as part of a folder name: 0.5, concat, true, q_proj+v_proj, rank-8+alpha-16."""
    if isinstance(value, dict):
        text = "+".join(f"{k}-{label_of(v)}" for k, v in value.items())
    elif isinstance(value, list):
        text = "+".join(label_of(v) for v in value)
    else:
        text = json.dumps(value) if value is None or isinstance(value, bool) else str(value)
    return re.sub(r"[^\w.+-]", "_", text)


# -- workspaces and state ---------------------------------------------------------------------------


def params_text(run: Run) -> str:
    return yaml.safe_dump(run.params, sort_keys=False)


def prepare_workspace(run: Run, cache: Path | None, root: Path = Path(".")) -> None:
    """Create the run's DVC project (once), then bring its params, dvc.yaml and data files up to date. `cache`:
    the DVC cache the study's runs share on this machine; None: the workspace's own (a worker's)."""
    ws = run.folder
    if not (ws / ".dvc").is_dir():
        with atomic_dir(ws) as tmp:
            share = [["cache", "dir", os.path.relpath(cache, ws)]] if cache else []
            links = ["config", "cache.type", CACHE_LINKS]  # outputs on disk once, not again in the cache
            for args in (["init", "--no-scm", "-q"], ["config", "core.analytics", "false"], links, *share):
                out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp, capture_output=True, text=True)
                if out.returncode:
                    raise UserError(
                        f"{ws}: dvc {args[0]} failed: {(out.stderr.strip() or 'no output').splitlines()[-1]}"
                    )
    models = [
        v
        for keys in MODELS
        if isinstance(v := lookup(run.params, *keys), str) and (root / v).is_dir() and not Path(v).is_absolute()
    ]
    for name in (*CODE, *models):
        if not (ws / name).is_symlink():
            (ws / name).parent.mkdir(parents=True, exist_ok=True)
            (ws / name).symlink_to(os.path.relpath(root.resolve() / name, (ws / name).parent.resolve()))
    # dvc.yaml only to begin with: the run's `rlhf run` writes the one of its own params
    for name in ("dvc.yaml", ".dvcignore", *data_files(run.params, root)):
        if name == "dvc.yaml" and (ws / name).is_file():
            continue
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, ws / name) if (root / name).is_file() else shutil.copytree(
            root / name, ws / name, dirs_exist_ok=True
        )
    # Every key written, defaults included (rlhf/core/defaults.py), as the run's `rlhf run` would complete it
    full = with_defaults(run.params)
    if not (ws / "params.yaml").is_file() or yaml.safe_load((ws / "params.yaml").read_text()) != full:
        write_text(ws / "params.yaml", yaml.safe_dump(full, sort_keys=False))


def data_files(params: dict, root: Path) -> list[str]:
    """The relative paths of the data files the run's params name (prompts, SFT and co-training sets, ...)."""
    out = []
    for key in INPUT_FILES:
        value = lookup(params, *key.split("."))
        value = value.get("path") if isinstance(value, dict) else value  # a prompt set given as a section
        if isinstance(value, str) and not Path(value).is_absolute() and (root / value).exists():
            out.append(value)
    for task in lookup(params, "evaluate", "lm_eval") or []:
        # a task YAML of the user's, with the folder it sits in: the data files it names relative to the project
        path = Path(task)
        if task.endswith((".yaml", ".yml")) and not path.is_absolute() and (root / path).is_file():
            out.append(task if path.parent == Path(".") else str(path.parent))
    return out


def write_state(run: Run, state: str, message: str | None = None, started: float | None = None) -> None:
    now = time.time()
    write_json(
        run.folder / STATE,
        {
            "state": state,
            "message": message,
            "params_sha256": hashlib.sha256(params_text(run).encode()).hexdigest(),
            "started": started or now,
            "seconds": round(now - (started or now), 1),
        },
    )


def run_status(study: Study, run: Run, active: bool) -> tuple[str, str]:
    """(state, note): done, running, failed (note: its message), interrupted, changed, incomplete or
    not started. Anything but done is run again by `rlhf study run`. `active`: a study run holds the study."""
    path = run.folder / STATE
    if not path.is_file():
        return "not started", ""
    state = json.loads(path.read_text())
    if state["params_sha256"] != hashlib.sha256(params_text(run).encode()).hexdigest():
        return "changed", "the study's params for it changed since it ran"
    if state["state"] == "running":
        return ("running", "") if active else ("interrupted", "the study run stopped before it finished")
    if state["state"] == "done" and not finished(study, run):
        return "incomplete", f"outputs of {study.rounds[-1]} are missing"
    return state["state"], state.get("message") or ""


def finished(study: Study, run: Run) -> bool:
    last = round_paths(study.rounds[-1], run.folder)
    return all(getattr(last, out).exists() for outs in STEP_OUTPUT.values() for out in outs)


def rounds_done(study: Study, run: Run) -> int:
    return sum(round_paths(r, run.folder).metrics.is_file() for r in study.rounds[1:])


@contextmanager
def study_lock(study: Study) -> Iterator[None]:
    """One `rlhf study run` per study at a time (an flock: a killed study frees it)."""
    study.folder.mkdir(parents=True, exist_ok=True)
    with open(study.folder / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{study.folder}: another `rlhf study run` is running this study") from None
        yield


def is_active(study: Study) -> bool:
    try:
        with study_lock(study):
            return False
    except UserError:
        return True


def status_table(study: Study, rows: list[tuple[str, str, str, str]] | None = None) -> str:
    """Each run's (id, state, rounds done, note): from the runs' folders here, or the `rows` a pool's server gave."""
    if rows is None:
        active = is_active(study) if study.folder.is_dir() else False
        rows = []
        for r in study.runs:
            state, note = run_status(study, r, active)
            rows.append((r.id, state, f"{rounds_done(study, r)}/{len(study.rounds) - 1}", note))
    counts = {s: sum(row[1] == s for row in rows) for s in dict.fromkeys(row[1] for row in rows)}
    width = max(len(r.id) for r in study.runs)
    lines = [f"{r.ljust(width)}  {s:<12} {n:>6}  {note}".rstrip() for r, s, n, note in rows]
    head = f"{'run'.ljust(width)}  {'state':<12} {'rounds':>6}  note"
    return "\n".join([study.describe(), ", ".join(f"{n} {s}" for s, n in counts.items()), "", head, *lines])
