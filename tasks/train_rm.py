"""train_rm: a proxy reward model trained with TRL's RewardTrainer on preference pairs chosen across rounds.

Data (`train_rm.data`): `last` this round's pairs, `concat` every round's so far, `sample` an equal share
of each round's, `sample_size` in all (each prompt at most once with `unique_prompts`). Objectives:
`bt` Bradley-Terry, -log sigmoid(r_c - r_r); `bt_margin` the same less the gold score margin inside the
sigmoid (Llama 2); `absolute` regresses the gold score of each response (MSE); `combined` trains a
preference head (BT) and an absolute head (MSE) at once and rewards w sigmoid(r_pref) + (1-w) sigmoid(r_abs).
"""

from __future__ import annotations

import logging
import random
import tempfile

from rlhf.core.config import TRAINING_RUNTIME, Config
from rlhf.core.errors import UserError
from rlhf.core.paths import SFT, round_paths
from rlhf.ml.pairs import read_pairs
from rlhf.ml.reward import rm_rounds

log = logging.getLogger("rlhf")


PARAMS = (*TRAINING_RUNTIME, "train_rm")


def data_rounds(cfg: Config, rnd: str) -> list[str]:
    """The rounds whose labels round `rnd`'s RM trains on (train_rm.data)."""
    return [rnd] if cfg.train_rm.data == "last" else rm_rounds(rnd)


def init_dir(cfg: Config, rnd: str):
    """The folder the RM starts from (train_rm.init): the SFT policy, the base LM, or the previous RM."""
    t, prev = cfg.train_rm, cfg.rounds[rnd]
    if t.init == "last" and prev != "r00":
        return round_paths(prev).reward_model
    return SFT.base if t.init == "base" else SFT.policy


def reads(cfg: Config, rnd: str) -> list[str]:
    return [*(str(round_paths(r).labels) for r in data_rounds(cfg, rnd)), str(init_dir(cfg, rnd))]


def rm_pairs(cfg: Config, rnd: str, seed: int) -> list[dict]:
    """The pairs this round's RM trains on, each tagged with the round it was labelled in."""
    t = cfg.train_rm
    rounds = data_rounds(cfg, rnd)
    per_round = {r: [{**p, "round": r} for p in read_pairs(round_paths(r).labels)] for r in rounds}
    if t.data != "sample":
        return [p for r in rounds for p in per_round[r]]
    rng, taken, out = random.Random(seed), set(), []
    for i, r in enumerate(rounds):
        share = t.sample_size // len(rounds) + (i < t.sample_size % len(rounds))
        pool = [p for p in per_round[r] if not (t.unique_prompts and p["prompt"] in taken)]
        if t.unique_prompts:  # one pair per prompt, so that no prompt repeats within or across rounds
            pool = list({p["prompt"]: p for p in rng.sample(pool, len(pool))}.values())
        if len(pool) < share:
            raise UserError(f"train_rm.sample_size: round {r} has {len(pool)} usable pairs, its share is {share}")
        picked = rng.sample(pool, share)
        taken |= {p["prompt"] for p in picked}
        out += picked
    return out


def train_rm(cfg: Config, rnd: str) -> dict:
    from datasets import Dataset
    from trl import RewardConfig

    from rlhf.ml import models
    from rlhf.ml.rm_objectives import ObjectiveRewardTrainer
    from rlhf.ml.sampling import reward_scores

    seed = models.setup(cfg, "train_rm", rnd)
    paths, t = round_paths(rnd), cfg.train_rm
    pairs = rm_pairs(cfg, rnd, seed)
    if len(pairs) < 2:
        raise UserError(f"{paths.labels}: {len(pairs)} preference pairs, need at least 2 (are all samples tied?)")
    tok, rm = _initial_rm(cfg, rnd)
    cols = {
        "bt": (),
        "bt_margin": ("margin",),
        "absolute": ("chosen_gold", "rejected_gold"),
        "combined": ("chosen_gold", "rejected_gold"),
    }[t.objective]
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected", *cols)} for p in pairs])
    with tempfile.TemporaryDirectory() as scratch:
        args = models.train_args(
            RewardConfig,
            cfg,
            seed,
            scratch,
            num_train_epochs=t.epochs,
            per_device_train_batch_size=t.batch_size,
            learning_rate=t.learning_rate,
            max_length=t.max_length,
        )
        trainer = models.trainer(
            ObjectiveRewardTrainer, model=rm, args=args, train_dataset=data, processing_class=tok, objective=t.objective
        )
        result = trainer.train()
    models.save(rm, tok, paths.reward_model, trainer=trainer)
    # Scored through the trainer's engine: a sharded RM's weights exist whole only inside its forward pass.
    prompts, forward = [p["prompt"] for p in pairs], models.engine(trainer, rm)
    margin = reward_scores(rm, tok, prompts, [p["chosen"] for p in pairs], forward=forward) - reward_scores(
        rm, tok, prompts, [p["rejected"] for p in pairs], forward=forward
    )
    counts = {r: sum(p["round"] == r for p in pairs) for r in dict.fromkeys(p["round"] for p in pairs)}
    return {
        "pairs": len(pairs),
        "pairs_per_round": counts,
        "train_loss": result.training_loss,
        "train_accuracy": float((margin > 0).mean()),
    }


def _initial_rm(cfg: Config, rnd: str):
    """Tokenizer and RM to train: from the SFT policy or the base LM with a new head, or the previous RM."""
    from rlhf.ml import models

    t, prev, init = cfg.train_rm, cfg.rounds[rnd], init_dir(cfg, rnd)
    heads = 2 if t.objective == "combined" else 1
    if init == round_paths(prev).reward_model:
        rm = models.load_reward_model(init, models.device(cfg))
        if rm.config.num_labels != heads:
            raise UserError(
                f"train_rm.init: last, but {prev}'s RM has {rm.config.num_labels} outputs and "
                f"objective {t.objective} needs {heads}"
            )
        return models.load_tokenizer(init), rm
    tok, rm = models.load_tokenizer(init), models.load_reward_model(init, models.device(cfg), num_labels=heads)
    rm.config.pad_token_id = tok.pad_token_id  # the RM reads the last non-pad token
    if t.objective == "combined":
        rm.config.combined_weight = t.weight  # saved with the RM, read by rlhf.ml.sampling.reward_of
    return tok, rm
