"""Batched generation, sequence log-probabilities and reward-model scores.

Text conventions match TRL's trainers: a response continues its prompt by plain string concatenation
(`prompt + response`), and a reward model scores `prompt + response + eos`, as RewardTrainer trained it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from rlhf.core.config import Sampling
from rlhf.core.errors import UserError
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
    stops = stop_ids(tok, model)
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


def require_vllm() -> None:
    """`generate.backend: vllm` needs vLLM installed and a GPU; otherwise one line saying which is missing."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "generate.backend: vllm is not installed (pip install vllm, on a machine with a GPU); "
            "or use generate.backend: transformers"
        )
    import torch

    if not torch.cuda.is_available():
        raise UserError("generate.backend: vllm needs a GPU and none is visible; use generate.backend: transformers")


def generate_vllm(policy_dir, tok, prompts: list[str], k: int, s: Sampling, seed: int) -> Samples:
    """`generate` by vLLM for the policy saved in `policy_dir` (a LoRA adapter runs over its base): the same
    samples structure, each prompt seeded on its own (seed + its index), so a prompt's samples do not depend
    on how vLLM batches."""
    import json
    from pathlib import Path

    require_vllm()
    from vllm import LLM, SamplingParams

    engine, lora = {"model": str(policy_dir)}, None
    adapter = Path(policy_dir) / "adapter_config.json"
    if adapter.is_file():
        from vllm.lora.request import LoRARequest

        a = json.loads(adapter.read_text())
        rank = next(r for r in (8, 16, 32, 64, 128, 256, 512) if r >= a["r"])  # the ranks vLLM accepts
        engine = {"model": a["base_model_name_or_path"], "enable_lora": True, "max_lora_rank": rank}
        lora = LoRARequest("policy", 1, str(policy_dir))
    llm = LLM(**engine, tokenizer=str(policy_dir), seed=seed, trust_remote_code=False)
    stops = stop_ids(tok)
    prompt_ids = tok(prompts)["input_ids"]  # tokenised as the transformers backend does
    params = [
        SamplingParams(
            n=k,
            seed=seed + i,
            temperature=s.temperature,
            top_k=s.top_k or -1,
            top_p=s.top_p,
            max_tokens=s.max_new_tokens,
            stop_token_ids=stops,
        )
        for i in range(len(prompts))
    ]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, lora_request=lora)
    out = Samples([], [], [], [])
    for i, request in enumerate(outputs):  # in the order of the prompts
        for c in request.outputs:
            ids = list(c.token_ids)
            done = c.finish_reason == "stop"
            end = first_stop(ids, stops)
            if end is not None:
                ids = ids[: end + 1]
            elif done:  # stopped at a stop id, which vLLM may leave out of token_ids
                ids.append(c.stop_reason if isinstance(c.stop_reason, int) else stops[0])
            out.prompt_index.append(i)
            out.response_ids.append(ids)
            out.finished.append(done)
    out.responses = continuations(tok, [prompt_ids[i] for i in out.prompt_index], out.response_ids)
    log.info("generated %d samples with vLLM", len(out.responses))
    return out


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


def response_logits(model, ids, attn, start, length):
    """The logits that predict each response token, [rows, longest response, vocab], and the mask of real
    tokens; only these positions are kept, so a long prompt costs no vocabulary-wide memory."""
    pos, mask = response_positions(start, length)
    pos = pos.clamp(max=ids.shape[1] - 1).to(model.device)
    logits = model(input_ids=ids.to(model.device), attention_mask=attn.to(model.device)).logits
    return logits.gather(1, (pos - 1)[..., None].expand(-1, -1, logits.shape[-1])).float(), mask.to(model.device), pos


def response_logprobs(model, ids, attn, start, length, grad: bool = True):
    """log p of each response token, [rows, longest response] (0 beyond a row's end), and the mask."""
    import torch
    from trl.trainer.utils import selective_log_softmax

    with torch.set_grad_enabled(grad):
        logits, mask, pos = response_logits(model, ids, attn, start, length)
        logp = selective_log_softmax(logits, ids.to(model.device).gather(1, pos))
    return logp * mask, mask


def categorical_kl(logp, logq):
    """KL(p || q) of categorical distributions given as log-probabilities over the last axis (torch)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def sequence_kl(policy, ref, tok, prompts: list[str], samples: Samples, batch_size: int = 64):
    """KL(policy || ref) per sample: at each response position the exact KL between the two next-token
    distributions (summed over the vocabulary), summed over the response: unbiased for the sequence KL,
    never negative, lower in variance than the log-ratio of the sampled tokens, which is returned too
    (it goes negative when the samples do not come from `policy`). Returns (KL, log-ratio, lengths)."""
    import torch

    total, ratio, lengths = [], [], []
    for start in range(0, len(samples.responses), batch_size):
        sl = slice(start, start + batch_size)
        packed = pack(tok, [prompts[i] for i in samples.prompt_index[sl]], samples.response_ids[sl])
        logp = []
        for model in (policy, ref):
            model.eval()
            with torch.no_grad():
                logits, mask, pos = response_logits(model, *packed)
            logp.append(torch.log_softmax(logits.cpu(), -1))
        mask, taken = mask.cpu(), packed[0].gather(1, pos.cpu())[..., None]
        kl = categorical_kl(logp[0], logp[1]).clamp(min=0)  # clamp: rounding error only
        total.append((kl * mask).sum(-1))
        ratio.append(((logp[0].gather(-1, taken) - logp[1].gather(-1, taken)).squeeze(-1) * mask).sum(-1))
        lengths.append(mask.sum(-1))
    return torch.cat(total), torch.cat(ratio), torch.cat(lengths)


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
            scores[idx] = reward_of(rm, rm(**batch).logits).float().cpu().numpy()
    return scores


def reward_of(rm, logits):
    """The scalar reward from an RM's outputs: its one output, or for the `combined` objective's two heads
    w * sigmoid(preference) + (1 - w) * sigmoid(absolute)."""
    import torch

    if logits.shape[-1] == 1:
        return logits[..., 0]
    w = rm.config.combined_weight
    return w * torch.sigmoid(logits[..., 0]) + (1 - w) * torch.sigmoid(logits[..., 1])
