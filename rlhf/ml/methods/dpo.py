"""Iterated DPO: k samples per policy prompt, ranked by the proxy RM into best-vs-worst pairs (identical
pairs dropped), trained with TRL's DPOTrainer against the round's reference."""

from __future__ import annotations

from rlhf.core.errors import UserError
from rlhf.ml.cotrain import CoTrainMixin


def update(u) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhf.ml import models
    from rlhf.ml.pairs import best_worst

    up, k = u.cfg.update_policy, u.cfg.update_policy.k
    s = u.sample(u.prompts, k, u.cfg.generate)
    proxy = u.proxy([u.prompts[i] for i in s.prompt_index], s.responses)
    best, worst, valid = best_worst(proxy.reshape(len(u.prompts), k))
    rows = [
        {"prompt": p, "chosen": s.responses[i * k + b], "rejected": s.responses[i * k + w]}
        for i, (p, b, w, ok) in enumerate(zip(u.prompts, best, worst, valid))
        if ok and s.responses[i * k + b] != s.responses[i * k + w]
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
    trainer = type("CoTrainDPO", (CoTrainMixin, DPOTrainer), {"aux": u.aux, "sequences_per_example": 2})(
        model=u.policy, ref_model=u.ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=u.tok
    )
    result = trainer.train()
    return {"pairs": len(rows), "proxy_mean_of_samples": float(proxy.mean()), "train_loss": result.training_loss}
