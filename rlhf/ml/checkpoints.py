"""Intermediate policies of one update (`evaluate.checkpoints`: N), so evaluate can draw gold and proxy as
curves in d = sqrt(KL) rather than one point per round.

The N checkpoints sit at training progress i/(N+1), i = 1..N (the final policy is the point at 1), each
rounded to a whole step of the method's own counter (PPO's iterations, a TRL trainer's optimizer steps).
They are scratch (`round_paths(rnd).checkpoint(i)`): no DVC output, ignored by .dvcignore and git, cleared
when the update starts and deleted by evaluate once scored. Each folder also holds `checkpoint.json`
with the step it was taken at, so a short run that rounds two checkpoints onto one step says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

META = "checkpoint.json"


def fractions(n: int) -> list[float]:
    """The training progress of each of n checkpoints: evenly spaced, strictly inside (0, 1)."""
    return [i / (n + 1) for i in range(1, n + 1)]


def plan(n: int, total: int, lo: float = 0.0, hi: float = 1.0) -> dict[int, list[int]]:
    """Local step (1..total) -> the checkpoint indices saved after it, for a run covering progress (lo, hi]
    of the whole update (ReST's improve steps each cover a slice)."""
    out: dict[int, list[int]] = {}
    for i, f in enumerate(fractions(n), 1):
        if lo < f <= hi:
            step = min(total, max(1, round((f - lo) / (hi - lo) * total)))
            out.setdefault(step, []).append(i)
    return out


class Checkpoints:
    """Saves the trained policy at the planned steps; `n == 0` saves nothing."""

    def __init__(self, n: int, folder: Path, model, tok):
        self.n, self.folder, self.model, self.tok = n, Path(folder), model, tok
        shutil.rmtree(self.folder, ignore_errors=True)  # a stale set from an earlier run of the round

    def save(self, indices: list[int], step: int, total: int, lo: float = 0.0, hi: float = 1.0, trainer=None) -> None:
        """`trainer`: the trainer training the policy, through which a sharded policy's weights are gathered."""
        from rlhf.ml import models

        for i in indices:
            meta = {"index": i, "of": self.n, "step": step, "steps": total, "fraction": lo + (hi - lo) * step / total}
            models.save(self.model, self.tok, self.folder / f"ckpt-{i}", meta={META: meta}, trainer=trainer)

    def loop(self, total: int):
        """For a loop of `total` steps of its own (PPO): call the result after each step, 1-based."""
        targets = plan(self.n, total)
        return lambda step: self.save(targets.get(step, []), step, total)

    def callback(self, trainer, lo: float = 0.0, hi: float = 1.0):
        """A transformers TrainerCallback saving at the planned global steps of `state.max_steps`, `trainer`
        covering progress (lo, hi] of the update (every rank saves, so that a sharded policy is gathered;
        rlhf.ml.models.trainer adds it)."""
        from transformers import TrainerCallback

        ckpt = self

        class SaveCheckpoints(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                self.targets = plan(ckpt.n, state.max_steps, lo, hi)

            def on_step_end(self, args, state, control, **kw):
                if indices := self.targets.get(state.global_step):
                    ckpt.save(indices, state.global_step, state.max_steps, lo, hi, trainer)

        return SaveCheckpoints()


def saved(folder: Path) -> list[tuple[Path, dict]]:
    """The checkpoints in `folder`, by index, with their checkpoint.json."""
    found = [(p, json.loads((p / META).read_text())) for p in Path(folder).glob("ckpt-*") if (p / META).is_file()]
    return sorted(found, key=lambda x: x[1]["index"])
