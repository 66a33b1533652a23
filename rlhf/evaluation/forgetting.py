"""What the policy forgets, per round: evaluate's `forgetting`, `conversation` and `lm_eval` metrics.

- **forgetting**: the mean token NLL (nats) and perplexity of the round's policy on general text no step
  trains on (`evaluate.heldout`), beside the SFT policy's on the same tokens, overall and per `source`
  (the shipped file: rows drawn as the pre-training text and as the co-training set are, kept out of
  both). `delta_nll` > 0: the policy fits its priors' text worse than SFT did; co-training should keep it
  small. Deterministic: the same tokens every round, so rounds and configurations compare without noise.
- **conversation**: a fixed set of prompts outside the RLHF task (`evaluate.conversation_checks`), each
  answered `samples_per_prompt` times at temperature 1, scored by the gold judge and by the
  `conversational` rubric below.
- **lm_eval**: lm-evaluation-harness tasks (`evaluate.lm_eval`; rlhf/evaluation/harness.py).

The `conversational` rubric asks what a model that "stays conversational" does whatever the task: it ends
its turn (its end-of-turn token within evaluate.max_new_tokens: a model that forgot how to stop fails),
says something (not empty), and does not degenerate into repetition: seq-rep-4, the share of the answer's
word 4-grams that repeat an earlier one (Welleck et al. 2019), at most 0.5. An answer passing all three is
conversational. It needs no model and no task, so it means the same on any policy; what it cannot judge
(sense, helpfulness) is the gold judge's part.
"""

from __future__ import annotations

import math

import numpy as np

from rlhf.core.config import Config, PromptSet
from rlhf.core.prompts import messages_of, read_prompts
from rlhf.evaluation import harness
from rlhf.evaluation import metrics as stats

MAX_REPETITION = 0.5  # seq-rep-4 above this: degenerate repetition


def seq_rep(words: list[str], n: int = 4) -> float:
    """Share of the word n-grams that repeat an earlier n-gram of the same answer (0 for fewer than n words)."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def conversational(responses: list[str], finished: list[bool]) -> dict[str, np.ndarray]:
    """The rubric's checks per response: ended, non_empty, repetition (seq-rep-4), and conversational (all
    three passed)."""
    words = [r.split() for r in responses]
    ended = np.array(finished, dtype=bool)
    non_empty = np.array([bool(w) for w in words])
    repetition = np.array([seq_rep(w) for w in words])
    return {
        "ended": ended,
        "non_empty": non_empty,
        "repetition": repetition,
        "conversational": ended & non_empty & (repetition <= MAX_REPETITION),
    }


def nll_summary(nll: np.ndarray, sft_nll: np.ndarray, tokens: np.ndarray, sources: list[str]) -> dict:
    """metrics["forgetting"] from per-row summed NLLs of the policy and the SFT policy and the tokens scored:
    token-weighted means overall and per source."""

    def one(rows) -> dict:
        n = int(tokens[rows].sum())
        if n == 0:
            return stats.missing("no token scored (every row cut at the length limit?)")
        mine, sft = float(nll[rows].sum() / n), float(sft_nll[rows].sum() / n)
        return {
            "nll": mine,
            "ppl": math.exp(mine),
            "sft_nll": sft,
            "sft_ppl": math.exp(sft),
            "delta_nll": mine - sft,
            "tokens": n,
            "rows": int(np.size(tokens[rows])),
        }

    out = one(slice(None))
    names = sorted(set(sources))
    if len(names) > 1:
        src = np.array(sources)
        out["sources"] = {name: one(src == name) for name in names}
    return out


def heldout(cfg: Config, tok, policy, sft) -> dict:
    """The round's policy's and the SFT policy's NLL on evaluate.heldout (`sft` is the policy itself at r00).
    Rows are cut to the longest sequence evaluate otherwise feeds the policy (prompt limit + response)."""
    from rlhf.ml import nll

    rows = nll.read_heldout(cfg.evaluate.heldout)
    contexts, texts = [r["context"] for r in rows], [r["text"] for r in rows]
    limit = cfg.prompts.max_prompt_length + cfg.evaluate.max_new_tokens
    mine, tokens = nll.token_nll(policy, tok, contexts, texts, limit)
    theirs = mine if sft is policy else nll.token_nll(sft, tok, contexts, texts, limit)[0]
    return {**nll_summary(mine, theirs, tokens, [r["source"] for r in rows]), "file": cfg.evaluate.heldout}


def conversation(cfg: Config, rnd: str, tok, sample, judge, sampling) -> dict:
    """The conversation checks answered by the round's sampler (`sampling`: the policy's own, temperature 1)
    and scored by the rubric and the gold judge; `examples`: the first answer to each check."""
    from rlhf.judges import checked
    from rlhf.ml import chat

    key = "evaluate.conversation_checks"
    found = read_prompts(PromptSet(path=cfg.evaluate.conversation_checks), key)
    rows, prompts, _ = chat.policy_prompts(tok, found, cfg.prompts, key)
    s = sample(prompts, sampling.k, sampling)
    asked = [messages_of(rows[i]["prompt"]) for i in s.prompt_index]
    gold = checked(judge.score(asked, s.responses), f"evaluate@{rnd} (conversation checks)")
    checks = conversational(s.responses, s.finished)
    first = {}
    for j, i in enumerate(s.prompt_index):
        first.setdefault(i, j)
    return {
        "checks": len(rows),
        "samples": len(s.responses),
        "conversational": float(checks["conversational"].mean()),
        "ended": float(checks["ended"].mean()),
        "non_empty": float(checks["non_empty"].mean()),
        "repetition": float(checks["repetition"].mean()),
        "gold": float(gold.mean()),
        "examples": [
            {
                "id": rows[i]["id"],
                "response": s.responses[j],
                "conversational": bool(checks["conversational"][j]),
                "gold": float(gold[j]),
            }
            for i, j in first.items()
        ],
    }


def reads(cfg: Config) -> list[str]:
    """The files these metrics read: the held-out text, the conversation checks, lm_eval task YAMLs."""
    e = cfg.evaluate
    checks = PromptSet(path=e.conversation_checks).files() if e.conversation_checks else []
    return [*([e.heldout] if e.heldout else []), *checks, *harness.files(e.lm_eval)]


def measure(cfg: Config, rnd: str, tok, policy, sft, sample, judge, sampling, seed: int) -> dict:
    """The metrics of what the policy forgets that evaluate.* turns on, keyed as in metrics.json. Called after
    every other sampling of the round, so that turning these on changes none of the round's other numbers."""
    e, out = cfg.evaluate, {}
    if e.heldout:
        out["forgetting"] = heldout(cfg, tok, policy, sft)
    if e.conversation_checks:
        out["conversation"] = conversation(cfg, rnd, tok, sample, judge, sampling)
    if e.lm_eval:
        out["lm_eval"] = harness.run(e.lm_eval, policy, tok, e.lm_eval_limit, seed)
    return out


def lines(metrics: dict) -> list[str]:
    """The round's forgetting numbers in a line or two, for its summary (rlhf/evaluation/report.py)."""
    out = []
    f, c = metrics.get("forgetting") or {}, metrics.get("conversation") or {}
    if f.get("nll") is not None:
        parts = [
            f"held-out text NLL {f['nll']:.3f} (ppl {f['ppl']:.2f}), SFT {f['sft_nll']:.3f}, Δ {f['delta_nll']:+.3f}"
        ]
        parts += [f"{name} Δ {s['delta_nll']:+.3f}" for name, s in f.get("sources", {}).items() if "delta_nll" in s]
        out.append("; ".join(parts))
    if c:
        out.append(
            f"conversation checks: {c['conversational']:.0%} conversational (ended {c['ended']:.0%}, "
            f"seq-rep-4 {c['repetition']:.2f}), gold {c['gold']:.3f}"
        )
    for task, scores in (metrics.get("lm_eval") or {}).items():
        out.append(f"lm_eval {task}: " + ", ".join(f"{k} {v:.3f}" for k, v in harness.scores(scores).items()))
    return out
