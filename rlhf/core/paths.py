"""The one place for round paths, and the steps' names. dvc.yaml names the same paths (it is generated
from them: rlhf/orchestration/stages.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# One name per step everywhere: tasks/<step>.py, the DVC stage <step>@<round>, the Prefect task
# <round>-<step>, and the round's output folder or file.
ROUND_STEPS = ("generate", "label", "train_rm", "update_policy", "evaluate")
STEPS = ("prepare", *ROUND_STEPS)

ROUNDS_DIR = Path("data/rounds")
# DVC's cache.type for every project (a clone's .dvc/config, a study's workspaces): each round's outputs are linked
# from the cache, not copied into it, so a 7B round's weights are on disk once; linked outputs are read-only. Hard
# links first: DVC 3.67 moves a folder output's files into the cache and links them back only when `hardlink` is
# the first type (with reflink first, a model folder was copied on ext4); a symlink where the cache is on another
# device.
CACHE_LINKS = "hardlink,symlink,copy"


@dataclass(frozen=True)
class RoundPaths:
    root: Path

    @property
    def samples(self) -> Path:  # generate
        return self.root / "samples.jsonl"

    @property
    def labels(self) -> Path:  # label
        return self.root / "labels.jsonl"

    @property
    def reward_model(self) -> Path:  # train_rm
        return self.root / "reward_model"

    @property
    def policy(self) -> Path:  # update_policy (r00: prepare's SFT policy)
        return self.root / "policy"

    @property
    def training(self) -> Path:  # update_policy: how the update went (PPO's rollout KL per iteration)
        return self.policy / "training.json"

    @property
    def metrics(self) -> Path:  # evaluate
        return self.root / "metrics.json"

    @property
    def eval_samples(self) -> Path:  # evaluate: the held-out samples behind the metrics
        return self.root / "eval_samples.jsonl"

    @property
    def landscape(self) -> Path:  # evaluate: gold and proxy over the landscape grid (evaluate.landscape)
        return self.root / "landscape.json"

    @property
    def checkpoints(self) -> Path:  # update_policy (evaluate.checkpoints): scratch, no DVC output (see .dvcignore)
        return self.root / "checkpoints"

    def checkpoint(self, i: int) -> Path:  # the i-th intermediate policy, 1-based
        return self.checkpoints / f"ckpt-{i}"

    @property
    def base(self) -> Path:  # prepare only: the pre-trained base LM (r00)
        return self.root / "base"


# What each round step writes (attributes of RoundPaths: outs, then metrics); dvc.yaml must agree.
STEP_OUTPUT = {
    "generate": ("samples",),
    "label": ("labels",),
    "train_rm": ("reward_model",),
    "update_policy": ("policy",),
    "evaluate": ("eval_samples", "landscape", "metrics"),
}


def round_paths(name: str, project: str | Path = ".") -> RoundPaths:
    return RoundPaths(Path(project) / ROUNDS_DIR / name)


SFT = round_paths("r00")


def step_files(step: str, rnd: str) -> list[Path]:
    """The files in the DVC outputs of a step's stage (prepare: all of r00)."""
    paths = round_paths(rnd)
    outs = [SFT.root] if step == "prepare" else [getattr(paths, name) for name in STEP_OUTPUT[step]]
    return [f for out in outs for f in ([out] if out.is_file() else out.rglob("*")) if f.is_file()]
