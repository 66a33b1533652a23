"""Gold judges: the fixed reward that stands in for human labellers (`label.judge` in params.yaml).

A judge has `score(prompts, responses) -> numpy array` and `best` (the most it can give, or None).
`make_judge` builds the configured one: the programmatic rubric (rubric.py), any Python callable
(python.py), or a reward model (reward_models.py).
"""

from __future__ import annotations

import logging

import numpy as np

from rlhf.core.errors import UserError
from rlhf.judges.python import CallableJudge
from rlhf.judges.rubric import PinkElephantJudge

__all__ = ["CallableJudge", "PinkElephantJudge", "checked", "make_judge", "score_in_workers"]

log = logging.getLogger("rlhf")


def make_judge(cfg, dev: str | None = None):
    j = cfg.label.judge
    if j.type == "rubric":
        return PinkElephantJudge(cfg.label.world)
    if j.type == "python":
        return CallableJudge(j.name, j.best)
    from rlhf.judges.reward_models import load_model_judge
    from rlhf.ml import models

    return load_model_judge(j, dev or models.device(cfg))


def judge_files(cfg) -> list[str]:
    """What the gold judge reads besides the samples: the rubric's world file, a reward model's local
    folder, or the project's own module of a python judge (a stage that scores with the judge depends on it)."""
    from pathlib import Path

    j = cfg.label.judge
    if j.type == "rubric":
        return [cfg.label.world]
    if j.type == "python":
        module = Path(*j.name.split(":")[0].split("."))
        return [str(p) for p in (module.with_suffix(".py"), module / "__init__.py") if p.is_file()][:1]
    return [str(Path(j.name).expanduser())] if Path(j.name).expanduser().is_dir() else []


def score_in_workers(cfg, prompts: list[str], responses: list[str]) -> np.ndarray:
    """Every response's gold score, by `label.workers` processes at once (e.g. a 13B judge on each of several
    GPUs: worker i on cuda:i), each loading the judge once and scoring one shard. The shards are whole
    batches of the one-process order (by length), dealt round-robin, so each batch, its padding and so its
    scores are exactly those of one process."""
    import multiprocessing

    from rlhf.judges.reward_models import length_order

    n = min(cfg.label.workers, len(prompts))
    if n == 1:
        return make_judge(cfg).score(prompts, responses)
    order, size = length_order(prompts, responses), cfg.label.judge.batch_size
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    shards = [np.concatenate(batches[w::n]) for w in range(n) if batches[w::n]]
    log.info("scoring %d samples in %d worker processes", len(prompts), len(shards))
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch or CUDA state
    workers = []
    for w, idx in enumerate(shards):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker,
            args=(cfg, w, [prompts[i] for i in idx], [responses[i] for i in idx], send),
            name=f"label-worker-{w}",
            daemon=True,
        )
        proc.start()
        send.close()
        workers.append((proc, recv, idx))
    scores = np.empty(len(prompts), dtype=np.float64)
    for w, (proc, recv, idx) in enumerate(workers):
        try:
            kind, value = recv.recv()
        except EOFError:
            proc.join()
            raise UserError(f"label.workers: worker {w} died (exit status {proc.exitcode})") from None
        proc.join()
        if kind == "error":
            raise UserError(value)
        scores[idx] = value
    return scores


def _worker(cfg, w: int, prompts: list[str], responses: list[str], conn) -> None:
    from rlhf.core.processes import die_with_parent

    die_with_parent()
    dev = None
    if cfg.label.judge.type in ("hf", "ultrarm"):
        import torch

        from rlhf.ml import models

        dev = models.device(cfg)
        dev = f"cuda:{w % torch.cuda.device_count()}" if dev.startswith("cuda") else dev
    try:
        conn.send(("ok", make_judge(cfg, dev).score(prompts, responses)))
    except UserError as e:
        conn.send(("error", str(e)))


def checked(scores: np.ndarray, source: str) -> np.ndarray:
    """A judge's scores, or one line naming the first sample it gave a non-finite score."""
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise UserError(f"{source}: the judge returned {scores[bad[0]]} for sample {bad[0] + 1}")
    return scores
