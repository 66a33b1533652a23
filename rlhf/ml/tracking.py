"""Training curves beyond TRL's trainers: the project's own PPO loop and each round's metrics go to
`runtime.report_to` through transformers' integration callbacks, the ones every Trainer reports with, so
TensorBoard, W&B, Trackio and MLflow show them beside the trainers' curves, under the same run names."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from numbers import Number
from pathlib import Path

from rlhf.core.config import Config
from rlhf.core.ranks import is_main


@contextmanager
def curves(cfg: Config, run: str):
    """Yields log(stats, step): a dict of scalars (nested dicts flattened to `a/b`; other values left out)
    at a step. `run`: the run's name, e.g. the stage's `r01-update_policy`, or `rounds` for the metrics of
    every round (step: the round number), one run whichever process writes it."""
    if cfg.runtime.report_to == "none" or not is_main():
        yield lambda stats, step: None
        return
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.integrations import get_reporting_integration_callbacks

    from rlhf.ml.models import LOGS

    before = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(LOGS, run).absolute())  # read as the callback is made
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, report_to=[cfg.runtime.report_to], run_name=run)
        callbacks = [cls() for cls in get_reporting_integration_callbacks(args.report_to)]
        if before is not None:
            os.environ["TENSORBOARD_LOGGING_DIR"] = before
        state, control = TrainerState(), TrainerControl()
        for cb in callbacks:
            cb.on_train_begin(args, state, control)

        def log(stats: dict, step: int) -> None:
            state.global_step = step
            for cb in callbacks:
                cb.on_log(args, state, control, logs=scalars(stats))

        try:
            yield log
        finally:
            for cb in callbacks:
                cb.on_train_end(args, state, control)


def scalars(stats: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict, keyed by their path (`kl/per_token`)."""
    out = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            out |= scalars(value, f"{prefix}{key}/")
        elif isinstance(value, Number) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out
