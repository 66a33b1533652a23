"""Evaluation statistics on score arrays, pure and vectorised: what `evaluate` writes into metrics.json.

A statistic that cannot be computed is `missing(reason)`, never 0: the table shows "-", the report
shows the reason, and the round still finishes.
"""

from __future__ import annotations

import math

import numpy as np


def lookup(m, *keys):
    """metrics["a"]["b"]... for keys ("a", "b", ...), or None where a level is missing."""
    for k in keys:
        m = m.get(k) if isinstance(m, dict) else None
    return m


def number(m, *keys) -> float | int | None:
    """lookup(m, *keys) if it is a number, else None (a missing or not-computed metric)."""
    v = lookup(m, *keys)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def missing(reason: str) -> dict:
    return {"mean": None, "missing": reason}


def summary(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return {**missing("no samples"), "count": 0}
    sd = float(values.std(ddof=1)) if n > 1 else 0.0
    return {"mean": float(values.mean()), "std": sd, "sem": sd / math.sqrt(n), "count": n}


def kl_estimate(per_sample, n_tokens) -> dict:
    """KL(policy || reference) estimated over sampled responses: each response's KL is exact (the two
    next-token distributions' KL at each of its positions, summed), their mean over responses an unbiased
    estimate of the per-sequence KL, with its standard error. d = √(mean KL) with its delta-method error
    (sem / 2√KL); d's own (Jensen) bias is about -d_sem² / 2d, second order: a small fraction of d_sem."""
    kl, n_tokens = np.asarray(per_sample, dtype=np.float64), np.asarray(n_tokens, dtype=np.float64)
    s = summary(kl)
    d = math.sqrt(max(s["mean"], 0.0))
    return {
        "per_sequence": s["mean"],
        "per_sequence_sem": s["sem"],
        "per_token": float(kl.sum() / n_tokens.sum()),
        "d": d,
        "d_sem": s["sem"] / (2 * d) if d > 0 else None,
        "samples": s["count"],
    }


def win_rate(mine: np.ndarray, theirs: np.ndarray) -> dict:
    """P(my gold > theirs) + P(tie) / 2 over every pair of samples answering the same prompt; inputs are
    (prompts, samples) score matrices in the same prompt order."""
    if mine.shape[0] != theirs.shape[0] or mine.size == 0 or theirs.size == 0:
        return missing(f"the rounds answered different prompt sets ({mine.shape[0]} vs {theirs.shape[0]})")
    a, b = mine[:, :, None], theirs[:, None, :]
    return {"mean": float(((a > b) + 0.5 * (a == b)).mean()), "pairs": int(a.shape[0] * a.shape[1] * b.shape[2])}


def pairwise_accuracy(proxy: np.ndarray, gold: np.ndarray) -> dict:
    """How often the proxy orders two samples of a prompt as gold does, over every pair with different
    gold scores; inputs are (prompts, samples)."""
    i, j = np.triu_indices(gold.shape[1], 1)
    dg, dp = gold[:, i] - gold[:, j], proxy[:, i] - proxy[:, j]
    scored = dg != 0
    if not scored.any():
        return {**missing("no two samples of a prompt differ in gold score"), "pairs": 0}
    return {"mean": float(((dg * dp)[scored] > 0).mean()), "pairs": int(scored.sum())}


def standardised_mmd(x: np.ndarray, y: np.ndarray) -> float | dict:
    """MMD^2 (biased V-statistic, so never negative) with a unit-bandwidth Gaussian kernel between two
    score samples, each standardised to mean 0 and std 1 first: how differently the proxy and gold
    distributions are *shaped*, whatever their scales (Wolf et al. 2025)."""
    if len(x) < 2 or len(y) < 2 or x.std() == 0 or y.std() == 0:
        return missing("a score distribution has fewer than 2 samples or no spread")
    x, y = (x - x.mean()) / x.std(), (y - y.mean()) / y.std()

    def k(a, b):
        return np.exp(-0.5 * (a[:, None] - b[None, :]) ** 2).mean()

    return float(max(k(x, x) + k(y, y) - 2 * k(x, y), 0.0))


def best_of_n_kl(n: int) -> float:
    """The analytic log n - (n - 1) / n: an upper bound on the KL of best-of-n sampling to the policy it
    samples from (the round's policy, not the reference), tight only when the n samples never repeat."""
    return math.log(n) - (n - 1) / n


def best_of_n(proxy: np.ndarray, gold: np.ndarray, ns: list[int]) -> dict:
    """For each n: gold and proxy of the sample the proxy ranks best among each prompt's first n, and
    `kl_bound`, best_of_n_kl(n): a bound on the KL to the round's policy, not a measured KL; each mean's
    standard error over the prompts (`gold_sem`, `proxy_sem`)."""
    out = {}
    for n in ns:
        pick = proxy[:, :n].argmax(1)
        rows = np.arange(len(proxy))
        out[str(n)] = {"kl_bound": best_of_n_kl(n)}
        for key, scores in (("gold", gold), ("proxy", proxy)):
            s = summary(scores[rows, pick])
            out[str(n)] |= {key: s["mean"], f"{key}_sem": s["sem"]}
    return out


def unfinished(step: str, finished: float, limit: int) -> list[str]:
    """An alarm when most of a step's responses hit its token limit without ending: the judge and the proxy
    then score answers cut short (the limit too low, or a policy that does not end its turn)."""
    if finished >= 0.5:
        return []
    return [
        f"{1 - finished:.0%} of {step}'s responses hit {step}.max_new_tokens ({limit}) without ending: raise it, "
        "or check that the policy ends its turn (its eos)"
    ]


def alarms(kl_sampled: dict, now: dict, before: dict | None) -> list[str]:
    """Warnings a study should not miss. `kl_sampled`: the mean and sem of the sampled-token log-ratio KL
    estimate; `now`/`before`: this and the previous round's gold and proxy means (the proxy of both
    scored by this round's reward)."""
    out = []
    if kl_sampled["mean"] is not None and kl_sampled["mean"] < -2 * kl_sampled["sem"]:
        out.append(
            f"negative KL estimate ({kl_sampled['mean']:.3f} ± {kl_sampled['sem']:.3f}): the samples do "
            "not come from the distribution being scored (check the sampling settings)"
        )
    if before and now["gold"] < before["gold"] and now["proxy"] > before["proxy"]:
        out.append(
            f"over-optimisation: gold fell ({before['gold']:.3f} -> {now['gold']:.3f}) while the proxy "
            f"rose ({before['proxy']:.3f} -> {now['proxy']:.3f})"
        )
    return out


# The alarms that say a round made things worse (not only that it looks suspicious): a study's table marks them.
WORSE = ("regression:", "KL spike")

# A rollout KL more than SPIKE times the previous iteration's (or than SPIKE x KL_FLOOR nats after a smaller
# one: the first iterations from the reference start near 0) is a step the policy update did not control.
SPIKE, KL_FLOOR = 4.0, 1.0


def kl_spikes(step: str, kls: list[float]) -> list[str]:
    """An alarm per update iteration whose rollout KL (per sequence, to the reference) jumped over SPIKE times
    the previous iteration's, e.g. 'KL spike in update_policy@r03, iteration 2: 5.8 -> 161.6'."""
    return [
        f"KL spike in {step}, iteration {i}: {a:.1f} -> {b:.1f} (over {SPIKE:g}x in one iteration; "
        "update_policy.ppo.stop_kl or a lower learning rate bounds a step)"
        for i, (a, b) in enumerate(zip(kls, kls[1:]), 2)
        if b > SPIKE * max(a, KL_FLOOR)
    ]


def regressions(now: dict, earlier: dict[str, dict]) -> list[str]:
    """An alarm when gold fell beyond 3 standard errors (of the difference) below an earlier round's,
    whatever the proxy did. `now`, each earlier: gold summaries (mean, sem); `earlier`: name -> summary."""
    out = []
    for name, then in earlier.items():
        se = math.hypot(now["sem"], then["sem"])
        if now["mean"] < then["mean"] - 3 * se:
            out.append(
                f"regression: gold fell below {name}'s ({then['mean']:.3f} -> {now['mean']:.3f}, "
                f"{(then['mean'] - now['mean']) / se:.1f} standard errors)"
            )
    return out


def curve_alarms(curve: list[dict]) -> list[str]:
    """Over-optimisation inside a round: the proxy rising while gold falls between consecutive points of the
    round's curve (evaluate.checkpoints), one alarm per stretch, naming the checkpoint it started at."""
    out, running = [], False
    for a, b in zip(curve, curve[1:]):
        diverging = b["gold"] < a["gold"] and b["proxy"] > a["proxy"]
        if diverging and not running:
            out.append(
                f"over-optimisation inside the round from checkpoint {a['step']} ({a['fraction']:.0%} of the update, d "
                f"{a['d']:.3f}): gold fell ({a['gold']:.3f} -> {b['gold']:.3f}) while the proxy rose "
                f"({a['proxy']:.3f} -> {b['proxy']:.3f})"
            )
        running = diverging
    return out
