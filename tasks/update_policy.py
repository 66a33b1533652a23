"""update_policy: iterated DPO. The policy samples K responses per policy prompt, the proxy RM ranks
them, and TRL's DPOTrainer trains on best-vs-worst pairs with the SFT policy as the reference."""

from __future__ import annotations

import tempfile

from rlhf.config import Config
from rlhf.errors import UserError
from rlhf.io import read_prompts
from rlhf.paths import SFT, round_paths
from tasks.label import best_worst


def update_policy(cfg: Config, rnd: str) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhf import models, sampling

    seed = models.setup(cfg, "update_policy", rnd)
    paths, prev = round_paths(rnd), round_paths(cfg.rounds[rnd])
    dev, u = models.device(cfg), cfg.update_policy
    prompts = [p["prompt"] for p in read_prompts(cfg.prompts.policy)]
    tok = models.load_tokenizer(prev.policy)
    policy = models.load_policy(prev.policy, dev)
    rm = models.load_reward_model(paths.reward_model, dev)

    s = sampling.generate(policy, tok, prompts, u.k, cfg.generate)
    proxy = sampling.reward_scores(rm, tok, [prompts[i] for i in s.prompt_index], s.responses)
    del rm
    scores = proxy.reshape(len(prompts), u.k)
    best, worst, valid = best_worst(scores)
    rows = [
        {"prompt": p, "chosen": s.responses[i * u.k + b], "rejected": s.responses[i * u.k + w]}
        for i, (p, b, w, ok) in enumerate(zip(prompts, best, worst, valid))
        if ok and s.responses[i * u.k + b] != s.responses[i * u.k + w]
    ]
    if len(rows) < 2:
        raise UserError(f"{paths.reward_model}: the proxy RM ranks too few samples apart ({len(rows)} pairs)")
    ref = models.load_policy(SFT.policy, dev)
    with tempfile.TemporaryDirectory() as scratch:
        args = models.train_args(
            DPOConfig, cfg, seed, scratch, beta=u.beta, num_train_epochs=u.epochs,
            per_device_train_batch_size=u.batch_size, learning_rate=u.learning_rate, max_length=u.max_length,
        )
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
        result = trainer.train()
    models.save(policy, tok, paths.policy)
    return {"pairs": len(rows), "proxy_mean_of_samples": float(proxy.mean()), "train_loss": result.training_loss}
