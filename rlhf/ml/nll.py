"""A causal LM's negative log-likelihood of fixed text, batched: what the policy forgets (`evaluate.heldout`).

A row is either plain text, every token of which is scored given the ones before it (the first has nothing
to be predicted from, unless the tokenizer adds a BOS), or a prompt and a completion, only the completion
scored, as co-training's loss scores it (rlhf/ml/cotrain.py). Either way the eos that ends it is scored too.
"""

from __future__ import annotations

from rlhf.core.errors import UserError
from rlhf.core.io import read_jsonl

# Rows a backbone pass takes: as many as keep rows x longest row x hidden size within this many floats (the
# vocabulary-wide work is chunked apart, within runtime.logits_mb: rlhf/ml/logits.py).
HIDDEN_BUDGET = 2**24


def read_heldout(path: str, what: str = "evaluate.heldout") -> list[dict]:
    """The rows of a held-out text file as {"id", "source", "context", "text"}: a `text` row has an empty
    context; a `prompt`/`completion` row, its prompt. A row with neither is one line naming it."""
    rows = []
    for n, r in enumerate(read_jsonl(path, what=what), 1):
        if isinstance(r.get("text"), str) and r["text"].strip():
            context, text = "", r["text"]
        elif isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str) and r["completion"].strip():
            context, text = r["prompt"], r["completion"]
        else:
            raise UserError(
                f"{path}:{n}: needs a non-empty string `text`, or string `prompt` and `completion` ({what})"
            )
        rows.append(
            {"id": r.get("id", str(n)), "source": str(r.get("source", "all")), "context": context, "text": text}
        )
    return rows


def encode(tok, contexts: list[str], texts: list[str], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Each row's ids (context + text + eos, cut to max_length) and where its scored tokens start: after the
    context, and never at position 0 (nothing predicts the first token)."""
    eos = tok.eos_token_id
    heads = tok(contexts)["input_ids"]
    whole = tok([c + t for c, t in zip(contexts, texts, strict=True)])["input_ids"]
    ids = [(w if w and w[-1] == eos else [*w, eos])[:max_length] for w in whole]
    return ids, [max(len(h), 1) for h in heads]


def batches(lengths: list[int], per_token: int, budget: int = HIDDEN_BUDGET) -> list[list[int]]:
    """Row indices in batches of similar length (less padding), each holding as many rows as keep rows x its
    longest row x per_token within `budget`, and at least one."""
    import numpy as np

    out, batch = [], []
    for i in np.argsort(lengths, kind="stable").tolist():
        if batch and (len(batch) + 1) * lengths[i] * per_token > budget:  # sorted: row i is the longest yet
            out.append(batch)
            batch = []
        batch.append(i)
    return [*out, batch] if batch else out


def token_nll(model, tok, contexts: list[str], texts: list[str], max_length: int, budget: int = HIDDEN_BUDGET):
    """Per row, the summed NLL (nats) of its scored tokens and how many were scored (numpy arrays), from one
    backbone pass per batch of right-padded rows (padding and context carry no loss); the LM head only at the
    scored positions (rlhf/ml/logits.py)."""
    import numpy as np
    import torch

    from rlhf.ml import logits

    ids, starts = encode(tok, contexts, texts, max_length)
    total, count = np.zeros(len(ids)), np.zeros(len(ids), dtype=np.int64)
    model.eval()
    for rows in batches([len(x) for x in ids], model.config.get_text_config().hidden_size, budget):
        width = max(len(ids[i]) for i in rows)
        batch = torch.tensor([ids[i] + [tok.pad_token_id] * (width - len(ids[i])) for i in rows])
        pos = torch.arange(width).expand(len(rows), -1)
        length = torch.tensor([len(ids[i]) for i in rows])
        start = torch.tensor([starts[i] for i in rows])
        scored = (pos >= start[:, None]) & (pos < length[:, None])  # position t is predicted from t - 1
        attn = (pos < length[:, None]).long()
        with torch.no_grad():
            logp = logits.token_logprobs(model, batch, attn, pos, scored)
        total[rows] = -logp.sum(1).double().cpu().numpy()
        count[rows] = scored.sum(1).numpy()
    return total, count
