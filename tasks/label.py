"""label: the gold judge scores every sample; the scores become preference pairs (best vs worst, or all
pairs), ties skipped or kept, with optional label noise; every score and each pair's margin are kept.

With `label.workers` > 1 the samples are scored in that many processes at once (rlhf/judges.py), with the
same scores as one process gives."""

from __future__ import annotations

import numpy as np

from rlhf.config import Config
from rlhf.errors import UserError
from rlhf.io import read_jsonl, write_jsonl
from rlhf.judges import score_in_workers
from rlhf.paths import round_paths


def best_worst(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a (prompts, K) score matrix: index of the best, of the worst, and whether they differ."""
    best, worst = scores.argmax(1), scores.argmin(1)
    rows = np.arange(len(scores))
    return best, worst, scores[rows, best] > scores[rows, worst]


def pairs_of(scores: np.ndarray, how: str, ties: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Preference pairs from a (prompts, K) score matrix: arrays of prompt, chosen and rejected indices.
    `best_worst` gives one pair per prompt, `all_pairs` every pair of samples, the higher score chosen;
    a tie (equal scores) is skipped, or kept with `ties: keep`."""
    n, k = scores.shape
    if how == "best_worst":
        a, b = scores.argmax(1)[:, None], scores.argmin(1)[:, None]
    else:
        i, j = np.triu_indices(k, 1)
        a, b = np.broadcast_to(i, (n, len(i))), np.broadcast_to(j, (n, len(j)))
    prompt = np.broadcast_to(np.arange(n)[:, None], a.shape)
    sa, sb = np.take_along_axis(scores, a, 1), np.take_along_axis(scores, b, 1)
    keep = (sa != sb) | (ties == "keep")
    chosen, rejected = np.where(sa >= sb, a, b), np.where(sa >= sb, b, a)
    return prompt[keep], chosen[keep], rejected[keep]


def group_by_prompt(rows: list[dict], source: str) -> list[list[dict]]:
    """Samples grouped per prompt (in first-seen order); every prompt must have the same K."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["prompt_id"], []).append(row)
    ks = {len(g) for g in groups.values()}
    if len(ks) != 1 or ks.pop() < 2:
        raise UserError(f"{source}: every prompt needs the same number (>= 2) of samples")
    return list(groups.values())


def checked(scores: np.ndarray, source: str) -> np.ndarray:
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise UserError(f"{source}: the judge returned {scores[bad[0]]} for sample {bad[0] + 1}")
    return scores


def label(cfg: Config, rnd: str) -> dict:
    from rlhf.models import stage_seed

    seed = stage_seed(cfg, "label", rnd)
    paths, lab = round_paths(rnd), cfg.label
    groups = group_by_prompt(read_jsonl(paths.samples, required=("prompt_id", "prompt", "response")), str(paths.samples))
    flat = [r for g in groups for r in g]
    gold = checked(score_in_workers(cfg, [r["prompt"] for r in flat], [r["response"] for r in flat]), str(paths.samples))
    gold = gold.reshape(len(groups), -1)
    prompt, chosen, rejected = pairs_of(gold, lab.pairs, lab.ties)
    if not len(prompt):
        raise UserError(f"{paths.samples}: the judge gave every sample of each prompt the same score, so there is no "
                        "preference pair (label.ties: keep to keep tied pairs)")
    flipped = np.random.default_rng(seed).random(len(prompt)) < lab.noise  # AlpacaFarm-style label noise
    chosen, rejected = np.where(flipped, rejected, chosen), np.where(flipped, chosen, rejected)
    out = [{"prompt_id": g[0]["prompt_id"], "prompt": g[0]["prompt"], "responses": [r["response"] for r in g],
            "gold": s.tolist(), "pairs": []} for g, s in zip(groups, gold)]
    for p, c, r, f in zip(prompt, chosen, rejected, flipped):
        g = gold[p]
        out[p]["pairs"].append({"chosen": out[p]["responses"][c], "rejected": out[p]["responses"][r],
                                "chosen_gold": float(g[c]), "rejected_gold": float(g[r]),
                                "margin": float(abs(g[c] - g[r])), "flipped": bool(f)})
    write_jsonl(paths.labels, out)
    return {"prompts": len(groups), "pairs": len(prompt), "flipped": int(flipped.sum()), "gold_mean": float(gold.mean())}


def read_pairs(path) -> list[dict]:
    """The preference pairs of a labels.jsonl, one dict per pair with its prompt."""
    return [{"prompt": row["prompt"], **pair} for row in read_jsonl(path, required=("prompt", "pairs"))
            for pair in row["pairs"]]
