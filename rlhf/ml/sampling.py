"""Batched generation, sequence log-probabilities and reward-model scores.

Text conventions match TRL's trainers: a response continues its prompt by plain string concatenation
(`prompt + response`), and a reward model scores `prompt + response + eos`, as RewardTrainer trained it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from rlhf.core.config import Sampling
from rlhf.ml.chat import stop_ids

log = logging.getLogger("rlhf")


@dataclass
class Samples:
    prompt_index: list[int]  # which prompt each sample answers
    responses: list[str]
    response_ids: list[list[int]]  # generated ids, the eos included when the response finished
    finished: list[bool]


def generate(model, tok, prompts: list[str], k: int, s: Sampling, max_new_tokens: int | None = None) -> Samples:
    """k samples per prompt (rendered texts, rlhf/ml/chat.py), in batches of left-padded prompts (seed torch
    before calling). A response ends at the first of the policy's stop ids, which it keeps."""
    import torch

    tok.padding_side = "left"
    stops = stop_ids(tok, getattr(model, "generation_config", None))
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
                eos_token_id=stops,
            )
        width = batch["input_ids"].shape[1]
        for i, ids in zip(idx, seqs[:, width:].tolist()):
            end = first_stop(ids, stops)
            out.prompt_index.append(i)
            out.response_ids.append(ids if end is None else ids[: end + 1])
            out.finished.append(end is not None)
        out.responses.extend(continuations(tok, batch["input_ids"].tolist(), out.response_ids[-len(idx) :]))
        log.info("generated %d/%d samples", min(start + s.batch_size, len(order)), len(order))
    tok.padding_side = "right"
    return out


def first_stop(ids: list[int], stops: list[int]) -> int | None:
    """Where a response ends: the position of its first stop id, or None if it never ended."""
    return next((n for n, t in enumerate(ids) if t in stops), None)


def continuations(tok, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[str]:
    """The text each response adds to its prompt, so that `prompt + response` is exactly what was sampled
    (leading space included, which a plain decode of the response alone drops)."""
    kw = {"skip_special_tokens": True}
    whole = tok.batch_decode([p + r for p, r in zip(prompt_ids, response_ids)], **kw)
    head = tok.batch_decode(prompt_ids, **kw)
    return [w[len(h) :] for w, h in zip(whole, head)]


def pack(tok, prompts: list[str], response_ids: list[list[int]]):
    """Right-padded prompt + response ids, the attention mask, each row's first response position and
    the response lengths (tensors). Right padding keeps the positions generation saw (0, 1, ...)."""
    import torch

    prompt_ids = tok(prompts)["input_ids"]
    rows = [p + r for p, r in zip(prompt_ids, response_ids, strict=True)]
    ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, row in enumerate(rows):
        ids[j, : len(row)] = torch.tensor(row)
        mask[j, : len(row)] = 1
    return ids, mask, torch.tensor(list(map(len, prompt_ids))), torch.tensor(list(map(len, response_ids)))


def response_positions(start, length):
    """Index of each response token in its packed row, [rows, longest response], and the mask of real ones."""
    import torch

    offset = torch.arange(int(length.max()))
    return start[:, None] + offset, offset < length[:, None]


def response_logprobs(model, ids, attn, start, length, grad: bool = True, temperature: float = 1.0):
    """log p of each response token under the policy at `temperature` (that of the distribution sampled),
    [rows, longest response] (0 beyond a row's end), and the mask; the LM head only at the response's positions,
    in chunks within runtime.logits_mb (rlhf/ml/logits.py)."""
    from rlhf.ml import logits

    pos, mask = response_positions(start, length)
    logp = logits.token_logprobs(model, ids, attn, pos, mask, temperature, grad)
    return logp, mask.to(logp.device)


def sequence_kl(policy, ref, tok, prompts: list[str], samples: Samples, batch_size: int = 64):
    """KL(policy || ref) per sample: at each response position the exact KL between the two next-token
    distributions (summed over the vocabulary), summed over the response: unbiased for the sequence KL,
    never negative, lower in variance than the log-ratio of the sampled tokens, which is returned too
    (it goes negative when the samples do not come from `policy`). Returns (KL, log-ratio, lengths), on the CPU;
    the vocabulary-wide work stays within runtime.logits_mb on the models' device (rlhf/ml/logits.py)."""
    import torch

    from rlhf.ml import logits

    total, ratio, lengths = [], [], []
    policy.eval(), ref.eval()
    for start in range(0, len(samples.responses), batch_size):
        sl = slice(start, start + batch_size)
        ids, attn, first, length = pack(tok, [prompts[i] for i in samples.prompt_index[sl]], samples.response_ids[sl])
        pos, mask = response_positions(first, length)
        kl, logp, logq = logits.token_kl(policy, ref, ids, attn, pos, mask)
        total.append(kl.sum(-1).cpu())
        ratio.append((logp - logq).sum(-1).cpu())
        lengths.append(mask.sum(-1))
    return torch.cat(total), torch.cat(ratio), torch.cat(lengths)


def reward_scores(rm, tok, prompts: list[str], responses: list[str], finished=None, batch_size: int = 64, forward=None):
    """Proxy reward of each (prompt, response), scored in length-sorted batches (a numpy array). A finished
    response is scored with its EOS, as the RM was trained; one that was cut off (finished False) without.
    `forward`: what runs the RM's forward pass when not `rm` itself, e.g. the engine that shards it in training
    (rlhf.ml.models.engine); every rank then scores the same batches."""
    import numpy as np
    import torch

    ends = [tok.eos_token if done else "" for done in (finished if finished is not None else [True] * len(prompts))]
    texts = [p + r + e for p, r, e in zip(prompts, responses, ends, strict=True)]
    order = np.argsort([len(t) for t in texts], kind="stable")
    scores = np.empty(len(texts), dtype=np.float64)
    tok.padding_side = "right"
    forward = forward or rm
    forward.eval()
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        batch = tok([texts[i] for i in idx], return_tensors="pt", padding=True).to(rm.device)
        with torch.no_grad():
            scores[idx] = reward_of(rm, forward(**batch, use_cache=False).logits).float().cpu().numpy()
    return scores


def reward_of(rm, logits):
    """The scalar reward from an RM's outputs: its one output, or for the `combined` objective's two heads
    w * sigmoid(preference) + (1 - w) * sigmoid(absolute)."""
    import torch

    if logits.shape[-1] == 1:
        return logits[..., 0]
    w = rm.config.combined_weight
    return w * torch.sigmoid(logits[..., 0]) + (1 - w) * torch.sigmoid(logits[..., 1])
