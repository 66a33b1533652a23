"""evaluate: the round's policy on held-out prompts: gold and proxy score, the proxy's pairwise accuracy
against gold, and KL to the reference.

Samples are drawn at temperature 1 with no top-k/top-p, so they come from the policy itself. KL(policy ||
ref) sums, over each sampled response, the exact KL of the two next-token distributions at every
position: an unbiased estimate of the sequence KL that is never negative. The reference is the one the
update regularised toward (`update_policy.ref`); with `ref: init` the KL to the SFT policy is added.
"""

from __future__ import annotations

import math

from rlhf.config import Config, Sampling
from rlhf.io import read_prompts, write_json
from rlhf.paths import SFT, round_paths
from rlhf.judges import make_judge
from tasks.label import checked, pairs_of


def summary(values) -> dict:
    n = len(values)
    sd = float(values.std(ddof=1)) if n > 1 else 0.0
    return {"mean": float(values.mean()), "std": sd, "sem": sd / math.sqrt(n), "count": n}


def evaluate(cfg: Config, rnd: str) -> dict:
    from rlhf import models, sampling
    from rlhf.policy import reference
    from rlhf.reward import ProxyReward

    models.setup(cfg, "evaluate", rnd)
    paths, dev, e = round_paths(rnd), models.device(cfg), cfg.evaluate
    prompts = [p["prompt"] for p in read_prompts(cfg.prompts.eval)]
    tok = models.load_tokenizer(paths.policy)
    policy = models.load_policy(paths.policy, dev)
    pure = Sampling(k=e.samples_per_prompt, temperature=1.0, top_k=0, top_p=1.0,
                    max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
    s = sampling.generate(policy, tok, prompts, pure.k, pure)
    asked = [prompts[i] for i in s.prompt_index]
    judge = make_judge(cfg)
    gold = checked(judge.score(asked, s.responses), f"evaluate@{rnd}")
    metrics = {"round": rnd, "gold": {**summary(gold), "best": judge.best},
               "finished": sum(s.finished) / len(s.finished),
               "length": sum(map(len, s.response_ids)) / len(s.response_ids)}
    if rnd == "r00":  # the SFT policy is its own reference and has no proxy RM yet
        metrics["kl"] = {"per_sequence": 0.0, "per_token": 0.0}
    else:
        proxy = ProxyReward(cfg, rnd, tok, dev)(asked, s.responses)
        metrics["proxy"] = summary(proxy)
        # Does the reward the policy optimised rank held-out samples as the gold judge does? Every pair of
        # samples of a prompt with different gold scores counts once.
        p, c, r = pairs_of(gold.reshape(len(prompts), -1), "all_pairs", "skip")
        scores = proxy.reshape(len(prompts), -1)
        metrics["proxy_accuracy"] = {"mean": float((scores[p, c] > scores[p, r]).mean()) if len(p) else None,
                                     "pairs": len(p)}
        refs = {"kl": reference(cfg, rnd, dev)}
        if cfg.update_policy.ref != "sft":
            refs["kl_sft"] = models.load_policy(SFT.policy, dev)
        for key, ref in refs.items():
            kl, n_tokens = sampling.sequence_kl(policy, ref, tok, prompts, s)
            kl = kl.double()
            metrics[key] = {"per_sequence": float(kl.mean()), "per_token": float(kl.sum() / n_tokens.sum())}
        metrics["kl"]["reference"] = cfg.update_policy.ref
    write_json(paths.metrics, metrics)
    return metrics
