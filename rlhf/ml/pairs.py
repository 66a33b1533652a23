"""Preference pairs from gold scores: the pairs label writes, the DPO pairs of a policy update, and the
pairs a reward model trains on."""

from __future__ import annotations

import numpy as np

from rlhf.core.errors import UserError
from rlhf.core.io import read_jsonl


def best_worst(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a (prompts, K) score matrix: index of the best, of the worst, and whether they differ."""
    best, worst = scores.argmax(1), scores.argmin(1)
    rows = np.arange(len(scores))
    return best, worst, scores[rows, best] > scores[rows, worst]


def pairs_of(scores: np.ndarray, how: str, ties: str, usable=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Preference pairs from a (prompts, K) score matrix: arrays of prompt, chosen and rejected indices.
    `best_worst` gives one pair per prompt, `all_pairs` every pair of samples, the higher score chosen;
    a tie (equal scores) is skipped, or kept with `ties: keep`. `usable` (prompts, K), e.g. the finished
    responses: pairs are made of those only (a prompt with fewer than two gives none)."""
    n, k = scores.shape
    usable = np.ones_like(scores, dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
    if how == "best_worst":
        a = np.where(usable, scores, -np.inf).argmax(1)[:, None]
        b = np.where(usable, scores, np.inf).argmin(1)[:, None]
    else:
        i, j = np.triu_indices(k, 1)
        a, b = np.broadcast_to(i, (n, len(i))), np.broadcast_to(j, (n, len(j)))
    prompt = np.broadcast_to(np.arange(n)[:, None], a.shape)
    sa, sb = np.take_along_axis(scores, a, 1), np.take_along_axis(scores, b, 1)
    both = np.take_along_axis(usable, a, 1) & np.take_along_axis(usable, b, 1) & (usable.sum(1) >= 2)[:, None]
    keep = ((sa != sb) | (ties == "keep")) & both
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


def read_pairs(path) -> list[dict]:
    """The preference pairs of a labels.jsonl, one dict per pair with its prompt."""
    return [
        {"prompt": row["prompt"], **pair}
        for row in read_jsonl(path, required=("prompt", "pairs"))
        for pair in row["pairs"]
    ]
