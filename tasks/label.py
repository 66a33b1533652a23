"""label: the gold judge scores every sample; each prompt's best and worst sample become a pair."""

from __future__ import annotations

import numpy as np

from rlhf.config import Config
from rlhf.errors import UserError
from rlhf.io import read_jsonl, write_jsonl
from rlhf.paths import round_paths


def best_worst(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a (prompts, K) score matrix: index of the best, of the worst, and whether they differ."""
    best, worst = scores.argmax(1), scores.argmin(1)
    rows = np.arange(len(scores))
    return best, worst, scores[rows, best] > scores[rows, worst]


def group_by_prompt(rows: list[dict], source: str) -> list[list[dict]]:
    """Samples grouped per prompt (in first-seen order); every prompt must have the same K."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["prompt_id"], []).append(row)
    ks = {len(g) for g in groups.values()}
    if len(ks) != 1 or ks.pop() < 2:
        raise UserError(f"{source}: every prompt needs the same number (>= 2) of samples")
    return list(groups.values())


def make_judge(cfg: Config):
    from rlhf.judges import PinkElephantJudge

    return PinkElephantJudge(cfg.label.world)


def checked(scores: np.ndarray, source: str) -> np.ndarray:
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise UserError(f"{source}: the judge returned {scores[bad[0]]} for sample {bad[0] + 1}")
    return scores


def label(cfg: Config, rnd: str) -> dict:
    paths = round_paths(rnd)
    groups = group_by_prompt(read_jsonl(paths.samples, required=("prompt_id", "prompt", "response")), str(paths.samples))
    flat = [r for g in groups for r in g]
    gold = checked(make_judge(cfg).score([r["prompt"] for r in flat], [r["response"] for r in flat]), str(paths.samples))
    gold = gold.reshape(len(groups), -1)
    best, worst, valid = best_worst(gold)
    out = []
    for g, s, b, w, ok in zip(groups, gold, best, worst, valid):
        out.append({
            "prompt_id": g[0]["prompt_id"], "prompt": g[0]["prompt"],
            "responses": [r["response"] for r in g], "gold": s.tolist(),
            "chosen": g[b]["response"] if ok else None, "rejected": g[w]["response"] if ok else None,
            "margin": float(s[b] - s[w]),
        })
    write_jsonl(paths.labels, out)
    return {"prompts": len(groups), "pairs": int(valid.sum()), "gold_mean": float(gold.mean())}
