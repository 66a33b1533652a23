"""Co-training: auxiliary prompt/completion batches mixed into the policy update (`update_policy.cotrain`).

After every `ratio` update batches comes one auxiliary batch of the same size. DPO, RLOO and PPO add its
completion-only NLL, times `coef`, to the update's loss (InstructGPT's pretraining mix); ReST mixes the
rows into its SFT data instead. `Aux` counts what was actually used, so a study can check the ratio.
"""

from __future__ import annotations

import random

from rlhf.core.config import CoTrain
from rlhf.core.io import read_jsonl


class Aux:
    def __init__(self, rows: list[dict], spec: CoTrain, tok, batch_size: int, max_length: int, seed: int):
        self.rows = rows
        self.ratio, self.coef, self.batch_size, self.max_length = spec.ratio, spec.coef, batch_size, max_length
        self.tok, self._rng = tok, random.Random(seed)
        self._queue: list[dict] = []
        self.update_batches = self.update_examples = self.aux_batches = self.aux_examples = 0

    @classmethod
    def from_params(cls, spec: CoTrain, tok, batch_size: int, max_length: int, seed: int) -> Aux:
        rows = read_jsonl(spec.data, required=("prompt", "completion"), what="update_policy.cotrain.data")
        return cls(rows, spec, tok, batch_size, max_length, seed)

    def take(self, n: int) -> list[dict]:
        """The next n auxiliary rows: shuffled passes over the set, as many as needed."""
        out = []
        while len(out) < n:
            if not self._queue:
                self._queue = self._rng.sample(self.rows, len(self.rows))
            out.append(self._queue.pop())
        return out

    def after_update_batch(self, n_examples: int) -> list[dict] | None:
        """Count one update batch; every `ratio`-th one returns the auxiliary batch that goes with it."""
        self.update_batches += 1
        self.update_examples += n_examples
        if self.update_batches % self.ratio:
            return None
        self.aux_batches += 1
        self.aux_examples += self.batch_size
        return self.take(self.batch_size)

    def mix(self, n_update: int) -> list[dict]:
        """Rows to mix into `n_update` update examples at the ratio (ReST's data mix), counted."""
        rows = self.take(n_update // self.ratio)
        self.update_examples += n_update
        self.aux_examples += len(rows)
        return rows

    def loss(self, model, rows: list[dict], trl_fused: bool = False):
        """coef x the mean completion-only NLL of `rows` (prompt tokens and padding carry no loss), the LM head
        only at the completion's positions, in chunks. `trl_fused`: `model` is a TRL trainer's (as it wraps it for
        DDP, DeepSpeed or FSDP), whose forward TRL gave its fused, tiled LM head; else the project's own
        (rlhf/ml/logits.py)."""
        import torch

        from rlhf.ml import logits

        ids, attn, labels = completion_batch(self.tok, rows, self.max_length, model.device)
        if trl_fused:
            return self.coef * model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True).loss
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        scored = (labels != -100) & (pos > 0)  # the first token has nothing to be predicted from
        logp = logits.token_logprobs(model, ids, attn, pos, scored, grad=True)
        return -self.coef * logp.sum() / scored.sum().clamp(min=1)

    def counts(self) -> dict:
        return {
            "update_batches": self.update_batches,
            "update_examples": self.update_examples,
            "aux_batches": self.aux_batches,
            "aux_examples": self.aux_examples,
            "ratio": self.ratio,
        }


def completion_batch(tok, rows: list[dict], max_length: int, dev):
    """Right-padded prompt + completion + eos, with labels only on the completion and the eos."""
    import torch

    prompts = tok([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    whole = tok([r["prompt"] + r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    seqs = [(w + [tok.eos_token_id])[:max_length] for w in whole]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    labels, attn = torch.full_like(ids, -100), torch.zeros_like(ids)
    for j, (p, s) in enumerate(zip(prompts, seqs)):
        ids[j, : len(s)] = torch.tensor(s)
        attn[j, : len(s)] = 1
        labels[j, len(p) : len(s)] = ids[j, len(p) : len(s)]
    return ids.to(dev), attn.to(dev), labels.to(dev)


class CoTrainMixin:
    """Put before a TRL trainer class (`class T(CoTrainMixin, DPOTrainer)`): adds the auxiliary NLL to the
    loss of every `ratio`-th training batch."""

    aux: Aux | None = None
    sequences_per_example: int = 1  # DPO batches hold a chosen and a rejected sequence per pair

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.aux is None or not model.training:
            return out
        rows = self.aux.after_update_batch(_batch_rows(inputs) // self.sequences_per_example)
        if rows is None:
            return out
        extra = self.aux.loss(model, rows, trl_fused=True)  # TRL's trainers fuse the policy's LM head
        return (out[0] + extra, *out[1:]) if return_outputs else out + extra


def _batch_rows(inputs: dict) -> int:
    return next(v.shape[0] for v in inputs.values() if hasattr(v, "shape") and v.ndim)
