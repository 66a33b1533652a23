"""Shared fixtures: a tiny copy of the project (small prompt sets, a very small model) in a temp folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from rlhf.core.paths import CACHE_LINKS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small enough that a whole round takes seconds; big enough that each step visibly learns.
TINY = {
    "runtime": {"threads": 2},
    "rounds": {"r01": "r00"},
    "prepare": {
        "tiny": {
            "hidden_size": 64,
            "layers": 2,
            "heads": 2,
            "intermediate_size": 128,
            "pretrain_epochs": 1.0,
            "learning_rate": 0.003,
        },
        "sft_epochs": 2.0,
        "learning_rate": 0.003,
        "batch_size": 32,
    },
    "generate": {"k": 4, "max_new_tokens": 32},
    "train_rm": {"epochs": 3.0, "learning_rate": 0.001},
    "update_policy": {"k": 4, "dpo": {"epochs": 2.0, "learning_rate": 0.001}},
    "evaluate": {"samples_per_prompt": 2, "max_new_tokens": 32},
}
SUBSET = {"label": 200, "policy": 64, "eval": 24}


def deep_update(base: dict, change: dict) -> dict:
    out = dict(base)
    for k, v in change.items():
        deeper = isinstance(v, dict) and v and isinstance(base.get(k, {}), dict) and k != "rounds"  # {}: replaces
        out[k] = deep_update(base.get(k, {}), v) if deeper else v
    return out


def make_project(dest: Path, params: dict | None = None, subset: bool = True) -> Path:
    """A runnable copy of the project: code deps, data, dvc.yaml, params; a fresh DVC repo without git."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("rlhf", "tasks", "flows"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "data" / "prompts").mkdir(parents=True)
    for name in (
        "world.json",
        "sft.jsonl",
        "pretrain.txt",
        "cotrain.jsonl",
        "heldout.jsonl",
        "conversation_checks.jsonl",
    ):
        shutil.copy(ROOT / "data" / name, dest / "data" / name)
    for split, n in SUBSET.items():
        lines = (ROOT / "data" / "prompts" / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (dest / "data" / "prompts" / f"{split}.jsonl").write_text("".join(lines[:n] if subset else lines))
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(deep_update(base, params or {}), sort_keys=False))
    write_stages(dest)
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=dest, check=True)
    shutil.copy(ROOT / ".dvcignore", dest)
    for key, value in (("core.analytics", "false"), ("cache.type", CACHE_LINKS)):  # as a clone's .dvc/config
        subprocess.run([BIN / "dvc", "config", key, value], cwd=dest, check=True)
    return dest


def write_stages(project: Path) -> None:
    """The project's params.yaml completed and dvc.yaml written for it, as `rlhf stages` does."""
    from rlhf.orchestration import stages

    old = os.getcwd()
    os.chdir(project)
    try:
        stages.refresh()
    finally:
        os.chdir(old)


# Set before Prefect or DVC is imported: tests never touch ~/.prefect, /var/tmp/dvc or the network.
_HOME = Path(tempfile.mkdtemp(prefix="rlhf-tests-"))
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ["DVC_SITE_CACHE_DIR"] = str(_HOME / "dvc-site")
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download in tests
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
os.environ.pop("PREFECT_API_URL", None)


def run_round(project: Path, rounds: tuple[str, ...] = ("r01",), prepare: bool = True) -> dict:
    """prepare (unless done) and full rounds of `project`, in-process by the step functions; their summaries
    (the last round's)."""
    from rlhf.core.config import load_config
    from tasks.evaluate import evaluate
    from tasks.generate import generate
    from tasks.label import label
    from tasks.prepare import prepare as prepare_step
    from tasks.train_rm import train_rm
    from tasks.update_policy import update_policy

    old = os.getcwd()
    os.chdir(project)
    try:
        cfg = load_config()
        summaries = {"prepare": prepare_step(cfg)} if prepare else {}
        for rnd in rounds:
            for step in (generate, label, train_rm, update_policy, evaluate):
                summaries[step.__name__] = step(cfg, rnd)
    finally:
        os.chdir(old)
    return summaries


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """The tiny project after prepare and one full round, run in-process by the step functions."""
    project = make_project(tmp_path_factory.mktemp("steps") / "project", TINY)
    (project / "summaries.yaml").write_text(yaml.safe_dump(run_round(project)))
    return project


@pytest.fixture
def in_project(tiny_project, monkeypatch):
    monkeypatch.chdir(tiny_project)
    from rlhf.core.config import load_config

    return load_config()


def rendered(cfg, key: str, tok=None) -> list[str]:
    """A prompt set of `cfg` as the SFT policy sees it: rendered by its chat template (rlhf/ml/chat.py)."""
    from rlhf.core.paths import SFT
    from rlhf.core.prompts import read_prompts
    from rlhf.ml import chat, models

    tok = tok or models.load_tokenizer(SFT.policy)
    return chat.render(tok, [p["prompt"] for p in read_prompts(getattr(cfg.prompts, key))])
