"""label: the gold judge scores every sample; the scores become preference pairs (best vs worst, or all
pairs), ties skipped or kept, with optional label noise; every score and each pair's margin are kept.

With `label.workers` > 1 the samples are scored in that many processes at once (rlhf/judges/), with the
same scores as one process gives."""

from __future__ import annotations

import numpy as np

from rlhf.core.config import Config
from rlhf.core.errors import UserError
from rlhf.core.io import read_jsonl, write_jsonl
from rlhf.core.paths import round_paths
from rlhf.core.seeds import stage_seed
from rlhf.judges import checked, judge_files, score_in_workers
from rlhf.ml.pairs import group_by_prompt, pairs_of

PARAMS = ("runtime.seed", "label")


def reads(cfg: Config, rnd: str) -> list[str]:
    """The samples, and what the judge reads."""
    return [str(round_paths(rnd).samples), *judge_files(cfg)]


def label(cfg: Config, rnd: str) -> dict:
    seed = stage_seed(cfg, "label", rnd)
    paths, lab = round_paths(rnd), cfg.label
    groups = group_by_prompt(
        read_jsonl(paths.samples, required=("prompt_id", "prompt", "messages", "response", "finished")),
        str(paths.samples),
    )
    flat = [r for g in groups for r in g]
    conversations = [r["messages"] for r in flat]  # the judge reads the conversation, never the rendering
    gold = checked(score_in_workers(cfg, conversations, [r["response"] for r in flat]), str(paths.samples))
    gold = gold.reshape(len(groups), -1)
    finished = np.array([[r["finished"] for r in g] for g in groups])
    prompt, chosen, rejected = pairs_of(gold, lab.pairs, lab.ties, finished if lab.unfinished == "drop" else None)
    if not len(prompt):
        raise UserError(
            f"{paths.samples}: no preference pair: the judge gave every finished sample of each prompt the same "
            "score, or too few samples finished (label.ties: keep keeps tied pairs; label.unfinished: keep "
            "pairs unfinished ones; or raise generate.max_new_tokens)"
        )
    flipped = np.random.default_rng(seed).random(len(prompt)) < lab.noise  # AlpacaFarm-style label noise
    chosen, rejected = np.where(flipped, rejected, chosen), np.where(flipped, chosen, rejected)
    out = [
        {
            "prompt_id": g[0]["prompt_id"],
            "prompt": g[0]["prompt"],
            "messages": g[0]["messages"],
            "responses": [r["response"] for r in g],
            "finished": [r["finished"] for r in g],
            "gold": s.tolist(),
            "pairs": [],
        }
        for g, s in zip(groups, gold)
    ]
    for p, c, r, f in zip(prompt, chosen, rejected, flipped):
        g = gold[p]
        out[p]["pairs"].append(
            {
                "chosen": out[p]["responses"][c],
                "rejected": out[p]["responses"][r],
                "chosen_gold": float(g[c]),
                "rejected_gold": float(g[r]),
                "margin": float(abs(g[c] - g[r])),
                "flipped": bool(f),
            }
        )
    write_jsonl(paths.labels, out)
    return {
        "prompts": len(groups),
        "pairs": len(prompt),
        "unfinished": int((~finished).sum()),  # responses cut at max_new_tokens (left out of pairs with drop)
        "flipped": int(flipped.sum()),
        "gold_mean": float(gold.mean()),
    }
