"""Vocabulary-wide work in bounded memory: every log-probability, KL and NLL the project computes itself.

A next-token distribution over a 151,936-row vocabulary is 0.6 MB of float32 per token: a batch of 64 responses
of 256 tokens holds 10 GB in each copy of its logits. So nothing here asks a model for its logits. The hidden
states come from the model's backbone (once per batch, without a KV cache); only the positions used are kept,
flattened over rows; and the LM head projects them a chunk of tokens at a time, each chunk small enough that
every vocabulary-wide temporary of the computation fits in `runtime.logits_mb` together. Only per-token results
(a few floats each) are kept, on the model's device. With gradients (PPO's loss, co-training's NLL) each chunk
is checkpointed: its logits are recomputed in the backward pass rather than kept.

The head is the model's output layer followed by what its config says its forward does to the logits (a logit
scale, a final soft-cap); that it agrees with the model's own forward is checked once per model, on a few tokens.
TRL's trainers (DPO, RLOO, SFT) project through their own fused head in tiles: `size_trl_tiles` sizes those from
the same budget.
"""

from __future__ import annotations

import weakref

from rlhf.core.errors import UserError

# Vocabulary-wide float32 tensors a chunk of the KL holds at its peak (two log-softmaxes, a probability, a
# difference and its product): the chunk is sized so that this many of them fit in the budget. runtime.logits_mb
# is at least 6 x 32 MB so that each is 32 MB or more: glibc then maps it apart and unmaps it when freed. Smaller
# ones go to its heap, where the small tensors kept between chunks split the freed blocks, and a loop of chunks
# grew a process by 3 GB (seen at 5.5 MB chunks; a fixed lower mmap threshold cost training 50% in page faults).
COPIES = 6
_budget = 256 * 2**20  # bytes; set per stage from runtime.logits_mb (set_budget)
_checked: weakref.WeakSet = weakref.WeakSet()  # models whose head agreed with their own forward


def set_budget(mb: int) -> None:
    """The memory, in MB, that vocabulary-wide temporaries may take at once in this process."""
    global _budget
    _budget = mb * 2**20


def chunk_tokens(vocab: int, budget: int | None = None) -> int:
    """How many tokens one chunk projects: COPIES float32 rows of `vocab` each within the budget, at least one."""
    return max(1, (budget or _budget) // (COPIES * 4 * vocab))


def size_trl_tiles(budget: int | None = None) -> None:
    """TRL's fused LM head (DPO, RLOO, SFT) projects tiles of TOKEN_CHUNK_SIZE tokens x a vocabulary chunk and
    keeps a few tile-sized temporaries: fewer tokens a tile, so those fit in the budget too."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trainer_utils

    kernel.TOKEN_CHUNK_SIZE = chunk_tokens(trainer_utils._CHUNKED_LOGPROB_CHUNK_SIZE, budget)


class Head:
    """A causal LM's output layer as its forward applies it: the projection, then the config's logit scale
    (Cohere's `logit_scale`, Granite's `logits_scaling`) and final soft-cap (Gemma's); float32 out."""

    def __init__(self, model):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's own
        config = inner.config.get_text_config()
        self.backbone, self.layer = inner.base_model, inner.get_output_embeddings()
        self.scale = getattr(config, "logit_scale", None) or 1 / (getattr(config, "logits_scaling", None) or 1)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.vocab = self.layer.weight.shape[0]

    def hidden(self, ids, attn):
        """The last hidden states, [rows, length, hidden]."""
        return self.backbone(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state

    def __call__(self, hidden, temperature: float = 1.0):
        import torch

        logits = self.layer(hidden)
        if self.scale != 1:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float() / temperature if temperature != 1 else logits.float()


def head(model, ids=None, attn=None) -> Head:
    """The model's Head, checked against the model's own logits on the first few tokens of `ids` the first time."""
    h = Head(model)
    if model not in _checked and ids is not None:
        _check(model, h, ids[:1, :8], attn[:1, :8])
        _checked.add(model)
    return h


def _check(model, h: Head, ids, attn) -> None:
    import torch

    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
        mine = h(h.hidden(ids, attn))
    tol = 1e-4 if mine.dtype == theirs.dtype and next(model.parameters()).dtype == torch.float32 else 2e-2
    if not torch.allclose(mine, theirs, rtol=tol, atol=tol * theirs.abs().max().item()):
        raise UserError(
            f"{type(model).__name__}: its forward does more to the logits than the projection, logit scale and "
            "soft-cap that rlhf/ml/logits.py computes in chunks; this architecture is not supported yet"
        )


def token_logprobs(model, ids, attn, pos, mask, temperature: float = 1.0, grad: bool = False):
    """log p(ids[r, pos[r, j]] | the tokens before it) at `temperature`, [rows, positions], 0 where mask is False.
    `pos` must be >= 1 (the hidden state at pos - 1 predicts the token at pos)."""
    import torch

    dev = model.device
    ids, attn, pos, mask = ids.to(dev), attn.to(dev), pos.to(dev), mask.to(dev)
    h = head(model, ids, attn)
    with torch.set_grad_enabled(grad):
        hidden = h.hidden(ids, attn)
        at, targets = _at(hidden, ids, pos, mask)
        parts = [
            _maybe_checkpointed(_logprob, grad, h, at[sl], targets[sl], temperature) for sl in _chunks(len(at), h.vocab)
        ]
        flat = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
        return torch.zeros(mask.shape, device=dev, dtype=flat.dtype).masked_scatter(mask, flat)


def token_kl(model, ref, ids, attn, pos, mask, temperature: float = 1.0):
    """Per token, the exact KL(model || ref) of the two next-token distributions, and the log-probability of the
    token taken under each: three [rows, positions] tensors, 0 where mask is False. No gradient; both models on
    one device."""
    import torch

    dev = model.device
    ids, attn, pos, mask = ids.to(dev), attn.to(dev), pos.to(dev), mask.to(dev)
    mine, theirs = head(model, ids, attn), head(ref, ids, attn)
    with torch.no_grad():
        at, targets = _at(mine.hidden(ids, attn), ids, pos, mask)
        ref_at, _ = _at(theirs.hidden(ids, attn), ids, pos, mask)
        parts = [_kl(mine, theirs, at[sl], ref_at[sl], targets[sl], temperature) for sl in _chunks(len(at), mine.vocab)]
    flat = [torch.cat(p) if p else torch.zeros(0, device=dev) for p in zip(*parts)] if parts else [torch.zeros(0)] * 3
    return tuple(torch.zeros(mask.shape, device=dev).masked_scatter(mask, f.to(dev)) for f in flat)


def _at(hidden, ids, pos, mask):
    """The hidden states that predict the masked positions' tokens, [tokens, hidden], and those tokens."""
    before = (pos - 1).clamp(min=0, max=ids.shape[1] - 1)
    picked = hidden.gather(1, before[..., None].expand(-1, -1, hidden.shape[-1]))
    return picked[mask], ids.gather(1, pos.clamp(max=ids.shape[1] - 1))[mask]


def _chunks(n: int, vocab: int) -> list[slice]:
    size = chunk_tokens(vocab)
    return [slice(i, i + size) for i in range(0, n, size)]


def _maybe_checkpointed(fn, grad: bool, *args):
    if not grad:
        return fn(*args)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False)  # the chunk's logits are recomputed in the backward pass


def _logprob(h: Head, hidden, targets, temperature: float):
    logits = h(hidden, temperature)
    return logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(-1)


def _kl(mine: Head, theirs: Head, hidden, ref_hidden, targets, temperature: float):
    import torch

    logp = torch.log_softmax(mine(hidden, temperature), -1)
    logq = torch.log_softmax(theirs(ref_hidden, temperature), -1)
    kl = categorical_kl(logp, logq).clamp(min=0)  # clamp: rounding error only
    pick = targets[:, None]
    return kl, logp.gather(-1, pick)[:, 0], logq.gather(-1, pick)[:, 0]


def categorical_kl(logp, logq):
    """KL(p || q) of categorical distributions given as log-probabilities over the last axis (torch)."""
    return (logp.exp() * (logp - logq)).sum(-1)
