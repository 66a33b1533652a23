"""Prompt sets: rows of an id and a prompt, the prompt either a string or a conversation (TRL's standard and
conversational formats), read from a JSONL file, an s3:// JSONL object, a local dataset (parquet, JSON,
CSV, arrow, a `save_to_disk` folder) or a Hugging Face Hub dataset, through `datasets`.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}` ending in
a user turn. A preference dataset's `chosen` column (UltraFeedback) ends in the assistant's answer: the
answer is dropped, so the prompt is the conversation up to the last user turn.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from rlhf.core.errors import UserError

log = logging.getLogger("rlhf")
ROLES = ("system", "user", "assistant")
DATA_FILES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def messages_of(prompt) -> list[dict]:
    """The conversation of a prompt: a string is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def last_user_turn(prompt) -> str:
    """The text of the prompt's last user turn (the question a template or pair judge asks about)."""
    return next(m["content"] for m in reversed(messages_of(prompt)) if m["role"] == "user")


def text_length(prompt) -> int:
    """Characters of a prompt's text, its turns added up: how long a judge's input is, to sort by."""
    return sum(len(m["content"]) for m in messages_of(prompt))


def as_prompt(value, where: str):
    """A row's prompt checked: a non-empty string, or a conversation ending in a user turn (a trailing
    assistant answer, as in a preference set's `chosen`, is dropped). `where`: file and row, for the error."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: the prompt is empty")
        return value
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: the prompt must be a string or a list of messages (got {type(value).__name__})")
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: each message needs a role ({' | '.join(ROLES)}) and a string content")
    while value and value[-1]["role"] == "assistant":
        value = value[:-1]
    if not value or value[-1]["role"] != "user":
        raise UserError(f"{where}: the conversation has no user turn to answer")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def read_prompts(spec, what: str = "") -> list[dict]:
    """A prompt set's rows {"id", "prompt", ...}: `spec` a PromptSet (rlhf/core/config.py) or a path.
    `what`: the params key, named in errors. Ids are unique: the id column's, else a hash of the prompt
    (a repeated prompt is then kept once)."""
    from rlhf.core.config import PromptSet

    spec = spec if isinstance(spec, PromptSet) else PromptSet(path=str(spec))
    what = what or spec.path
    rows, where = _rows(spec, what)
    out, seen = [], {}
    for n, row in enumerate(rows, 1):
        if spec.column not in row:
            raise UserError(f"{where}: row {n}: no column {spec.column!r} ({what}.column; it has {sorted(row)})")
        prompt = as_prompt(row[spec.column], f"{where}: row {n}")
        key = spec.id_column or ("id" if "id" in row else None)
        if key is not None and key not in row:
            raise UserError(f"{where}: row {n}: no id column {key!r}")
        rid = str(row[key]) if key else _content_id(prompt)
        if rid in seen:
            if key is None:  # the same prompt twice: one is enough
                continue
            raise UserError(f"{where}: row {n}: duplicate id {rid!r} (first in row {seen[rid]})")
        seen[rid] = n
        out.append({**{k: v for k, v in row.items() if k != spec.column}, "id": rid, "prompt": prompt})
    if spec.sample is not None:
        import random

        out = random.Random(spec.seed).sample(out, min(spec.sample, len(out)))
    return out


def _content_id(prompt) -> str:
    return hashlib.sha1(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]


def _rows(spec, what: str) -> tuple[list[dict], str]:
    """The raw rows and how errors name their source. JSONL files (and s3:// objects) are read line by line,
    so a bad line is named; everything else goes through `datasets`."""
    from rlhf.core.io import read_jsonl

    path = spec.path
    local = Path(path).expanduser()
    if path.startswith("s3://") or (local.suffix == ".jsonl" and not local.is_dir()):
        return read_jsonl(path, required=(spec.column,), what=what), path
    if local.suffix in DATA_FILES and not local.exists():
        raise UserError(f"{path}: no such file ({what})")
    try:
        ds = _dataset(spec, local)
    except UserError:
        raise
    except FileNotFoundError as e:
        raise UserError(f"{what}: {path}: not found ({str(e).splitlines()[0]})") from None
    except Exception as e:  # datasets raises many kinds: a bad file, an unknown hub id offline, ...
        raise UserError(f"{what}: {path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if spec.column not in ds.column_names:
        raise UserError(f"{what}.column: {path} has no column {spec.column!r} (columns: {', '.join(ds.column_names)})")
    return ds.to_list(), f"{path} ({spec.split})"


def _dataset(spec, local: Path):
    """The split of a local dataset or a Hub dataset, loaded as `datasets` loads any (HF_HUB_OFFLINE and the
    HF cache apply)."""
    import os

    import datasets

    if not os.isatty(2):  # progress bars for a person at a terminal (a Hub download), not in logs and checks
        datasets.disable_progress_bars()

    if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            ds = _split(ds, spec)
        return ds
    if local.is_file():
        if local.suffix not in DATA_FILES:
            raise UserError(f"{spec.path}: not a prompt set format ({', '.join(DATA_FILES)} or a dataset folder)")
        return _split(datasets.load_dataset(DATA_FILES[local.suffix], data_files={spec.split: str(local)}), spec)
    if not local.exists() and spec.path.startswith((".", "/", "~")):
        raise UserError(f"{spec.path}: no such file or folder")
    return _split(datasets.load_dataset(spec.path, revision=spec.revision), spec)


def _split(dd, spec):
    if spec.split not in dd:
        raise UserError(f"{spec.path}: no split {spec.split!r} (its splits: {', '.join(dd)})")
    return dd[spec.split]


def describe(spec) -> dict:
    """What a round records of the prompt set it used: where from, which split and column, the revision asked
    for and the sample taken (a local file's content hash is in dvc.lock)."""
    out = {"path": spec.path, "split": spec.split, "column": spec.column}
    if spec.revision:
        out["revision"] = spec.revision
    if spec.sample is not None:
        out["sample"], out["seed"] = spec.sample, spec.seed
    return out
