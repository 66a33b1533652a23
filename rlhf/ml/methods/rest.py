"""ReST (Gulcehre et al. 2023): Grow, then Improve. Grow samples k responses per policy prompt and scores
them with the proxy RM; the normalised reward of a sample is its quantile among them (0 = worst, near 1
= best; a cut sample ranked as update_policy.unfinished says). Each Improve step fine-tunes (SFT,
completion-only NLL) on the finished samples whose quantile reaches that step's threshold, starting from
the previous step; thresholds rise, so the data narrows to the best. Co-training mixes auxiliary rows in
at the co-training ratio, and `keep_sft` one SFT row per selected sample."""

from __future__ import annotations

import random

from rlhf.core.errors import UserError
from rlhf.core.io import read_jsonl


def quantiles(scores):
    """Each score's rank among all, scaled to [0, 1): the normalised reward the thresholds apply to."""
    import numpy as np

    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(len(scores))
    return ranks / len(scores)


def update(u) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rlhf.ml import models

    up, cfg = u.cfg.update_policy, u.cfg
    s = u.sample(u.prompts, up.k, cfg.rollouts())
    asked = [u.prompts[i] for i in s.prompt_index]
    q = ranked(u, asked, s)
    sft = read_jsonl(cfg.prepare.sft, required=("prompt", "completion"), what="prepare.sft") if up.rest.keep_sft else []
    rng, steps, improve = random.Random(u.seed), [], len(up.rest.thresholds)
    for n, threshold in enumerate(up.rest.thresholds, 1):
        rows = [
            {"prompt": p, "completion": r}
            for p, r, done, qi in zip(asked, s.responses, s.finished, q)
            if done and qi >= threshold
        ]
        if not rows:
            raise UserError(f"update_policy.rest.thresholds: no finished sample reaches {threshold} (step {n})")
        used = {"samples": len(rows)}
        if sft:
            rows += [
                {"prompt": r["prompt"], "completion": r["completion"]} for r in rng.choices(sft, k=used["samples"])
            ]
            used["sft"] = used["samples"]
        if u.aux is not None:
            extra = u.aux.mix(used["samples"])
            rows += [{"prompt": r["prompt"], "completion": r["completion"]} for r in extra]
            used["aux"] = len(extra)
        args = models.train_args(
            SFTConfig,
            cfg,
            u.seed + n,
            u.scratch,
            num_train_epochs=up.rest.epochs,
            learning_rate=up.rest.learning_rate,
            per_device_train_batch_size=up.batch_size,
            max_length=up.max_length,
            completion_only_loss=True,
        )
        u.trainer = models.trainer(
            SFTTrainer,
            u.checkpoints,
            ((n - 1) / improve, n / improve),  # the checkpoints are spread over the improve steps
            model=u.policy,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=u.tok,
        )
        loss = u.trainer.train().training_loss
        steps.append({"threshold": threshold, **used, "train_loss": loss})
    return {"samples": len(s.responses), "finished": sum(s.finished), "improve_steps": steps}


def ranked(u, asked: list[str], s):
    """Each sample's quantile, as every method scores its rollouts: a cut one by the proxy without an EOS it
    never produced, less missing_eos_penalty (update_policy.unfinished: penalty), or left out of the ranking
    (drop: quantiles among the finished; the cut ones get -1, below any threshold)."""
    import numpy as np

    up, done = u.cfg.update_policy, np.array(s.finished)
    scores = u.proxy(asked, s.responses, s.finished) - (
        up.missing_eos_penalty * ~done if up.unfinished == "penalty" else 0
    )
    among = done if up.unfinished == "drop" else np.ones(len(done), dtype=bool)
    q = np.full(len(done), -1.0)
    q[among] = quantiles(scores[among])
    return q
