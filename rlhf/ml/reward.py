"""The reward the policy optimises (`update_policy.reward`): the one place the policy update and evaluate
turn proxy RMs into scores.

`last` is the round's RM; `ensemble_mean`, `ensemble_min` (worst-case, Coste et al.) and `ensemble_uwo`
(mean - lambda * std, uncertainty-weighted) combine the RMs of every round so far (raw scores, no
normalisation); `weight_average` scores with one RM whose parameters are the mean of theirs.
"""

from __future__ import annotations

import numpy as np

from rlhf.core.config import Config, round_index, round_name
from rlhf.core.paths import round_paths


def rm_rounds(rnd: str) -> list[str]:
    """Round 1 to `rnd`: every round whose reward model exists by the end of `rnd`'s train_rm."""
    return [round_name(j) for j in range(1, round_index(rnd) + 1)]


def reward_rounds(cfg: Config, rnd: str) -> list[str]:
    """The rounds whose reward models make round `rnd`'s reward (update_policy.reward)."""
    return [rnd] if cfg.update_policy.reward == "last" else rm_rounds(rnd)


def combine(scores: np.ndarray, how: str, uwo_lambda: float = 1.0) -> np.ndarray:
    """Ensemble scores, (RMs, samples) -> (samples,)."""
    if how == "ensemble_min":
        return scores.min(0)
    if how == "ensemble_uwo":
        return scores.mean(0) - uwo_lambda * (scores.std(0) if len(scores) > 1 else 0.0)
    return scores.mean(0)


def average_weights(rms: list):
    """The first model, its parameters replaced by the mean over all (tied weights counted once)."""
    import torch

    avg = rms[0]
    with torch.no_grad():
        for name, p in avg.named_parameters():
            p.copy_(torch.stack([dict(m.named_parameters())[name] for m in rms]).mean(0))
    return avg


class ProxyReward:
    def __init__(self, cfg: Config, rnd: str, tok, dev: str = "cpu"):
        from rlhf.ml import models

        up = cfg.update_policy
        names = reward_rounds(cfg, rnd)
        self.rms = [
            models.load_reward_model(round_paths(r).reward_model, dev).eval().requires_grad_(False) for r in names
        ]
        if up.reward == "weight_average":
            self.rms = [average_weights(self.rms)]
        self.how, self.uwo_lambda, self.tok, self.rounds = up.reward, up.uwo_lambda, tok, names

    def __call__(self, prompts: list[str], responses: list[str], finished=None) -> np.ndarray:
        """The reward of each response (`finished`: which ended, scored with their EOS; None: all)."""
        from rlhf.ml.sampling import reward_scores

        scores = np.stack([reward_scores(rm, self.tok, prompts, responses, finished) for rm in self.rms])
        return scores[0] if len(scores) == 1 else combine(scores, self.how, self.uwo_lambda)
