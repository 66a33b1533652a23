"""Vocabulary-wide work in bounded memory: every log-probability, KL and NLL the project computes itself.

A next-token distribution over a 151,936-row vocabulary is 0.6 MB of float32 per token: a batch of 64 responses
of 256 tokens holds 10 GB in each copy of its logits. So nothing here asks a model for its logits. The hidden
states come from the model's backbone (once per batch, without a KV cache); only the positions used are kept,
flattened over rows; and the LM head projects them a chunk of tokens at a time, each chunk small enough that
every vocabulary-wide temporary of the computation fits in `runtime.logits_mb` together. Only per-token results
(a few floats each) are kept, on the model's device. With gradients (PPO's loss, co-training's NLL) the backward
pass recomputes each chunk's logits rather than keeping them.

The head is the model's output layer followed by what its config says its forward does to the logits (a logit
scale, a final soft-cap); that it agrees with the model's own forward is checked once per model, on a few tokens.
TRL's trainers (DPO, RLOO, SFT) project through their own fused head in tiles: `size_trl_tiles` sizes those from
the same budget.
"""

from __future__ import annotations

import weakref

from rlhf.core.errors import UserError

# Vocabulary-wide float32 tensors a chunk holds at once: the KL's two log-softmaxes and a scratch buffer for the
# logits and then the probabilities. They are allocated once per call and reused by every chunk, the ops writing
# into them: a loop that allocates per chunk leaves glibc to place blocks of a few MB among the small tensors
# kept between chunks, and a process grew by 1.7 GB (5.5 MB chunks) or held twice its chunk now and then.
COPIES = 3
BACKWARD_COPIES = 12  # a chunk's backward: logits, log-softmax, their gradients, the softmax and the gather's
TRL_COPIES = 8
_budget = 128 * 2**20  # bytes; set per stage from runtime.logits_mb (set_budget)
_checked: weakref.WeakSet = weakref.WeakSet()  # models whose head agreed with their own forward


def set_budget(mb: int) -> None:
    """The memory, in MB, that vocabulary-wide temporaries may take at once in this process."""
    global _budget
    _budget = mb * 2**20


def chunk_tokens(vocab: int, budget: int | None = None, copies: int = COPIES) -> int:
    """How many tokens one chunk projects: `copies` float32 rows of `vocab` each within the budget, at least one."""
    return max(1, (budget or _budget) // (copies * 4 * vocab))


def size_trl_tiles(budget: int | None = None) -> None:
    """TRL's trainers (DPO, RLOO, SFT) project through a fused LM head in tiles of TOKEN_CHUNK_SIZE tokens x a
    vocabulary chunk; on a CPU its backward holds about TRL_COPIES tile-sized tensors at once (measured: 2.4 GB
    above the rest at TRL's 4,096 tokens and a 151,936-row vocabulary). Fewer tokens a tile, so those fit in the
    budget too."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trainer_utils

    tile = trainer_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    kernel.TOKEN_CHUNK_SIZE = max(1, (budget or _budget) // (TRL_COPIES * 4 * tile))


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

    def logprobs(self, hidden, targets, temperature: float = 1.0):
        """log p(targets) at `temperature`, one per row of hidden [tokens, hidden], a chunk of tokens at a time,
        each chunk's result written in place; differentiable (_chunked_logprobs)."""
        import torch

        if torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in self.layer.parameters())):
            return _chunked_logprobs(self, temperature)(hidden, targets)
        chunks, out = _chunks(len(hidden), self.vocab), torch.empty(len(hidden), device=hidden.device)
        logits, logp = _buffers(2, chunks, self.vocab, hidden.device)
        for sl in chunks:
            n = min(sl.stop, len(hidden)) - sl.start
            torch.log_softmax(self(hidden[sl], temperature, logits[:n]), -1, out=logp[:n])
            out[sl] = logp[:n].gather(-1, targets[sl, None])[:, 0]
        return out

    def __call__(self, hidden, temperature: float = 1.0, out=None):
        """The logits of hidden [tokens, hidden], float32, differentiable; or, given `out` (no gradient), written
        into it in place (a float32 linear layer projects straight into it)."""
        import torch

        if out is None:
            logits = self.layer(hidden).float()
            logits = logits * self.scale if self.scale != 1 else logits
            logits = torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits
            return logits / temperature if temperature != 1 else logits
        if type(self.layer) is torch.nn.Linear and self.layer.weight.dtype == torch.float32:
            torch.mm(hidden, self.layer.weight.t(), out=out)
            if self.layer.bias is not None:
                out.add_(self.layer.bias)
        else:
            out.copy_(self.layer(hidden))
        if self.scale != 1:
            out.mul_(self.scale)
        if self.softcap:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out.div_(temperature) if temperature != 1 else out


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
        at, targets = _at(h.hidden(ids, attn), ids, pos, mask)
        flat = h.logprobs(at, targets, temperature)
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
        chunks, flat = _chunks(len(at), mine.vocab), torch.zeros(3, len(at), device=dev)
        scratch, logp, logq = _buffers(3, chunks, mine.vocab, dev)
        for sl in chunks:
            n = min(sl.stop, len(at)) - sl.start
            torch.log_softmax(mine(at[sl], temperature, scratch[:n]), -1, out=logp[:n])
            torch.log_softmax(theirs(ref_at[sl], temperature, scratch[:n]), -1, out=logq[:n])
            flat[1, sl] = logp[:n].gather(-1, targets[sl, None])[:, 0]
            flat[2, sl] = logq[:n].gather(-1, targets[sl, None])[:, 0]
            p = torch.exp(logp[:n], out=scratch[:n])  # KL(p || q) = sum p (log p - log q), in the buffers
            flat[0, sl] = p.mul_(torch.sub(logp[:n], logq[:n], out=logq[:n])).sum(-1).clamp(min=0)
    return tuple(torch.zeros(mask.shape, device=dev).masked_scatter(mask, f) for f in flat)


def _at(hidden, ids, pos, mask):
    """The hidden states that predict the masked positions' tokens, [tokens, hidden], and those tokens."""
    before = (pos - 1).clamp(min=0, max=ids.shape[1] - 1)
    picked = hidden.gather(1, before[..., None].expand(-1, -1, hidden.shape[-1]))
    return picked[mask], ids.gather(1, pos.clamp(max=ids.shape[1] - 1))[mask]


def _buffers(k: int, chunks: list[slice], vocab: int, dev):
    """k float32 [chunk, vocab] buffers that every chunk of a call reuses: allocated once, never per chunk."""
    import torch

    rows = max((sl.stop - sl.start for sl in chunks), default=0)
    return torch.empty(k, rows, vocab, device=dev)


def _chunks(n: int, vocab: int, copies: int = COPIES) -> list[slice]:
    size = chunk_tokens(vocab, copies=copies)
    return [slice(i, i + size) for i in range(0, n, size)]


def _chunked_logprobs(head: Head, temperature: float):
    """Head.logprobs as an autograd function that keeps no vocabulary-wide tensor for the backward pass: forward
    writes each chunk's log-probabilities in place; backward recomputes each chunk's logits and backpropagates
    through them at once, the hidden states' gradient written in place and the head's weights' gradients
    accumulated where autograd keeps them (a weight of the head is no input of the function)."""
    import torch

    class Chunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, targets):
            ctx.save_for_backward(hidden, targets)
            with torch.no_grad():
                return head.logprobs(hidden, targets, temperature)

        @staticmethod
        def backward(ctx, grad):
            hidden, targets = ctx.saved_tensors
            grad_hidden = torch.zeros_like(hidden)
            with torch.enable_grad():
                for sl in _chunks(len(hidden), head.vocab, BACKWARD_COPIES):
                    part = hidden[sl].detach().requires_grad_()
                    _logprob(head, part, targets[sl], temperature).backward(grad[sl])
                    grad_hidden[sl] = part.grad
            return grad_hidden, None

    return Chunked.apply


def _logprob(h: Head, hidden, targets, temperature: float):
    logits = h(hidden, temperature)
    return logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(-1)


def categorical_kl(logp, logq):
    """KL(p || q) of categorical distributions given as log-probabilities over the last axis (torch)."""
    return (logp.exp() * (logp - logq)).sum(-1)
