"""Batched generation, sequence log-probabilities and reward-model scores.

Text conventions match TRL's trainers: a response continues its prompt by plain string concatenation
(`prompt + response`), and a reward model scores `prompt + response + eos`, as RewardTrainer trained it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from rlhf.config import Sampling

log = logging.getLogger("rlhf")


@dataclass
class Samples:
    prompt_index: list[int]  # which prompt each sample answers
    responses: list[str]
    response_ids: list[list[int]]  # generated ids, the eos included when the response finished
    finished: list[bool]


def generate(model, tok, prompts: list[str], k: int, s: Sampling, max_new_tokens: int | None = None) -> Samples:
    """k samples per prompt, in batches of left-padded prompts (seed torch before calling)."""
    import torch

    tok.padding_side = "left"
    order = [i for i in range(len(prompts)) for _ in range(k)]
    out = Samples([], [], [], [])
    model.eval()
    for start in range(0, len(order), s.batch_size):
        idx = order[start : start + s.batch_size]
        batch = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            seqs = model.generate(
                **batch,
                do_sample=True,
                temperature=s.temperature,
                top_k=s.top_k or None,
                top_p=s.top_p,
                max_new_tokens=max_new_tokens or s.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        width = batch["input_ids"].shape[1]
        for i, ids in zip(idx, seqs[:, width:].tolist()):
            done = tok.eos_token_id in ids
            out.prompt_index.append(i)
            out.response_ids.append(ids[: ids.index(tok.eos_token_id) + 1] if done else ids)
            out.finished.append(done)
        out.responses.extend(continuations(tok, batch["input_ids"].tolist(), out.response_ids[-len(idx) :]))
        log.info("generated %d/%d samples", min(start + s.batch_size, len(order)), len(order))
    tok.padding_side = "right"
    return out


def continuations(tok, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[str]:
    """The text each response adds to its prompt, so that `prompt + response` is exactly what was sampled
    (leading space included, which a plain decode of the response alone drops)."""
    kw = {"skip_special_tokens": True}
    whole = tok.batch_decode([p + r for p, r in zip(prompt_ids, response_ids)], **kw)
    head = tok.batch_decode(prompt_ids, **kw)
    return [w[len(h) :] for w, h in zip(whole, head)]


def sequence_logprobs(model, tok, prompts: list[str], samples: Samples, batch_size: int = 64):
    """Sum of log p(response token | prefix) per sample, and the response lengths (tensors)."""
    import torch

    total, lengths = [], []
    model.eval()
    for start in range(0, len(samples.responses), batch_size):
        sl = slice(start, start + batch_size)
        prompt_ids = tok([prompts[i] for i in samples.prompt_index[sl]])["input_ids"]
        rows = [p + r for p, r in zip(prompt_ids, samples.response_ids[sl])]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)  # response positions
        for j, (p, row) in enumerate(zip(prompt_ids, rows)):
            ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
            scored[j, len(p) : len(row)] = True
        ids, mask, scored = ids.to(model.device), mask.to(model.device), scored.to(model.device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        total.append((logp * scored[:, 1:]).sum(-1).cpu())
        lengths.append(scored.sum(-1).cpu())
    return torch.cat(total), torch.cat(lengths)


def reward_scores(rm, tok, prompts: list[str], responses: list[str], batch_size: int = 64):
    """Proxy reward of each (prompt, response), scored in length-sorted batches (a numpy array)."""
    import numpy as np
    import torch

    texts = [p + r + tok.eos_token for p, r in zip(prompts, responses, strict=True)]
    order = np.argsort([len(t) for t in texts], kind="stable")
    scores = np.empty(len(texts), dtype=np.float64)
    tok.padding_side = "right"
    rm.eval()
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        batch = tok([texts[i] for i in idx], return_tensors="pt", padding=True).to(rm.device)
        with torch.no_grad():
            scores[idx] = rm(**batch).logits[:, 0].float().cpu().numpy()
    return scores
