"""What a prompt is to the policy: its chat template renders the conversation once, with the generation
prompt, and a response ends at the template's end of turn.

A policy with a chat template sees every prompt through it (a string prompt is one user turn); one without
keeps plain strings and refuses conversations. The rendered text is what every later step uses as the
prompt (the proxy RM trains and scores `rendered + response + eos`, the KL and the methods read the same
ids), so it is made to tokenize, with the tokenizer's usual special tokens, to exactly the template's ids:
a BOS that the template writes and the tokenizer adds again is left to the tokenizer (TRL tokenizes
standard rows the same way).
"""

from __future__ import annotations

from rlhf.core.errors import UserError
from rlhf.core.prompts import messages_of


def has_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def render(tok, prompts: list, what: str = "prompts") -> list[str]:
    """Each prompt (a string or messages) as the policy's text, ready to be continued by its answer."""
    if not has_template(tok):
        if any(not isinstance(p, str) for p in prompts):
            raise UserError(
                f"{what}: conversational prompts need a policy with a chat template, and this one has none "
                "(set a chat_template in its tokenizer_config.json, or use string prompts)"
            )
        return list(prompts)
    texts = [_apply(tok, messages_of(p), f"{what}: prompt {i + 1}") for i, p in enumerate(prompts)]
    bos = tok.bos_token
    if bos and texts and _adds_bos(tok):
        texts = [t.removeprefix(bos) for t in texts]
    return texts


def _apply(tok, messages: list[dict], where: str) -> str:
    """One conversation through the template; a template that refuses it (many refuse a system turn, or
    turns that do not alternate, with raise_exception) is one line naming the prompt."""
    from jinja2 import TemplateError

    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:
        raise UserError(f"{where}: the policy's chat template refuses it: {e}") from None


def _adds_bos(tok) -> bool:
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def stop_ids(tok, generation_config=None) -> list[int]:
    """The ids that end a response: the tokenizer's eos and every eos the model's generation config names
    (an instruct model may end a turn with one token and a document with another)."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    extra = getattr(generation_config, "eos_token_id", None)
    for i in [extra] if isinstance(extra, int) else extra or []:
        if i not in ids:
            ids.append(i)
    if not ids:
        raise UserError(f"{tok.name_or_path}: the policy names no eos or end-of-turn token, so no response could end")
    return ids


def saved_generation_config(folder):
    """A saved policy's generation_config.json (a LoRA adapter's, its base's), or None where it has none."""
    import json
    from pathlib import Path

    from transformers import GenerationConfig

    folder = Path(folder).expanduser()
    if (folder / "adapter_config.json").is_file():
        folder = Path(json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]).expanduser()
    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:  # none saved (or a hub id not in the cache)
        return None


def policy_prompts(tok, rows: list[dict], spec, what: str) -> tuple[list[dict], list[str], int]:
    """A prompt set's rows as the policy sees them: rendered, then fitted into prompts.max_prompt_length
    (`spec`: the prompts section). Returns the rows kept, their rendered text and how many were too long."""
    texts = render(tok, [r["prompt"] for r in rows], what)
    kept, texts, too_long = fit_prompts(tok, texts, spec.max_prompt_length, spec.too_long, what)
    return [rows[i] for i in kept], texts, too_long


def fit_prompts(tok, prompts: list[str], limit: int, too_long: str, what: str) -> tuple[list[int], list[str], int]:
    """The prompts fitted into `limit` of `tok`'s tokens (the special tokens it adds included): the indices
    of those kept, their text, and how many were longer. With too_long=truncate a longer prompt is kept as
    its last tokens, cut at a token boundary of its text; with drop it is left out. One batched
    tokenisation, before any model runs. `what`: the params key of the prompt set, for the error when none fits."""
    import numpy as np

    room = limit - tok.num_special_tokens_to_add()
    enc = tok(prompts, add_special_tokens=False, return_offsets_mapping=True)
    lengths = np.array([len(ids) for ids in enc["input_ids"]])
    over = int((lengths > room).sum())
    if too_long == "drop":
        kept = np.flatnonzero(lengths <= room).tolist()
        if not kept:
            raise UserError(
                f"{what}: every prompt is longer than prompts.max_prompt_length ({limit} tokens); raise "
                "it, or set prompts.too_long: truncate"
            )
        return kept, [prompts[i] for i in kept], over
    texts = [
        p if n <= room else p[enc["offset_mapping"][i][-room][0] :] for i, (p, n) in enumerate(zip(prompts, lengths))
    ]
    return list(range(len(prompts))), texts, over
