"""train_rm: a proxy reward model trained with TRL's RewardTrainer (Bradley-Terry) on this round's pairs."""

from __future__ import annotations

import logging
import tempfile

from rlhf.config import Config
from rlhf.errors import UserError
from rlhf.io import read_jsonl
from rlhf.paths import SFT, round_paths

log = logging.getLogger("rlhf")


def train_rm(cfg: Config, rnd: str) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from rlhf import models
    from rlhf.sampling import reward_scores

    seed = models.setup(cfg, "train_rm", rnd)
    paths = round_paths(rnd)
    pairs = [r for r in read_jsonl(paths.labels, required=("prompt", "chosen", "rejected")) if r["chosen"] is not None]
    if len(pairs) < 2:
        raise UserError(f"{paths.labels}: {len(pairs)} preference pairs, need at least 2 (are all samples tied?)")
    init = SFT.policy if cfg.train_rm.init == "sft" else SFT.base
    tok = models.load_tokenizer(init)
    rm = models.load_reward_model(init, models.device(cfg))
    rm.config.pad_token_id = tok.pad_token_id  # the RM reads the last non-pad token
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs])
    t = cfg.train_rm
    with tempfile.TemporaryDirectory() as scratch:
        args = models.train_args(
            RewardConfig, cfg, seed, scratch, num_train_epochs=t.epochs, per_device_train_batch_size=t.batch_size,
            learning_rate=t.learning_rate, max_length=t.max_length,
        )
        result = RewardTrainer(model=rm, args=args, train_dataset=data, processing_class=tok).train()
    models.save(rm, tok, paths.reward_model)
    prompts = [r["prompt"] for r in pairs]
    margin = reward_scores(rm, tok, prompts, [r["chosen"] for r in pairs]) - reward_scores(
        rm, tok, prompts, [r["rejected"] for r in pairs]
    )
    return {"pairs": len(pairs), "train_loss": result.training_loss, "train_accuracy": float((margin > 0).mean())}
