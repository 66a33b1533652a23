"""Iterated DPO: k samples per policy prompt, ranked by the proxy RM into best-vs-worst pairs (identical
pairs dropped; a sample cut at max_new_tokens ranked less missing_eos_penalty, or left out, as
update_policy.unfinished says), trained with TRL's DPOTrainer against the round's reference."""

from __future__ import annotations

from rlhf.core.errors import UserError
from rlhf.ml.cotrain import CoTrainMixin


def update(u) -> dict:
    import numpy as np
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhf.ml import models
    from rlhf.ml.pairs import pairs_of

    up, k = u.cfg.update_policy, u.cfg.update_policy.k
    s = u.sample(u.prompts, k, u.cfg.rollouts())
    proxy = u.proxy([u.prompts[i] for i in s.prompt_index], s.responses, s.finished)
    cut = ~np.array(s.finished).reshape(len(u.prompts), k)
    scores = proxy.reshape(len(u.prompts), k) - (up.missing_eos_penalty * cut if up.unfinished == "penalty" else 0)
    prompt, best, worst = pairs_of(scores, "best_worst", "skip", ~cut if up.unfinished == "drop" else None)
    rows = [
        {"prompt": u.prompts[i], "chosen": s.responses[i * k + b], "rejected": s.responses[i * k + w]}
        for i, b, w in zip(prompt, best, worst)
        if s.responses[i * k + b] != s.responses[i * k + w]
    ]
    if len(rows) < 2:
        raise UserError(f"{u.paths.reward_model}: the proxy RM ranks too few samples apart ({len(rows)} pairs)")
    args = models.train_args(
        DPOConfig,
        u.cfg,
        u.seed,
        u.scratch,
        beta=up.dpo.beta,
        num_train_epochs=up.dpo.epochs,
        per_device_train_batch_size=up.batch_size,
        learning_rate=up.dpo.learning_rate,
        max_length=up.max_length,
    )
    u.trainer = models.trainer(
        type("CoTrainDPO", (CoTrainMixin, DPOTrainer), {"aux": u.aux, "sequences_per_example": 2}),
        u.checkpoints,
        model=u.policy,
        ref_model=u.ref,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=u.tok,
    )
    result = u.trainer.train()
    return {
        "pairs": len(rows),
        "unfinished": int(cut.sum()),
        "proxy_mean_of_samples": float(proxy.mean()),
        "train_loss": result.training_loss,
    }
