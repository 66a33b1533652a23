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
    `kl_bound`, best_of_n_kl(n): a bound on the KL to the round's policy, not a measured KL."""
    out = {}
    for n in ns:
        pick = proxy[:, :n].argmax(1)
        rows = np.arange(len(proxy))
        out[str(n)] = {
            "gold": float(gold[rows, pick].mean()),
            "proxy": float(proxy[rows, pick].mean()),
            "kl_bound": best_of_n_kl(n),
        }
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
