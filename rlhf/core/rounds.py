"""Continuing an iteration: which round finished last, and adding rounds to params.yaml.

A scheduled run ("one more round every night") extends `rounds` in params.yaml from the last completed
round. The file is the user's: the new entries are written into its `rounds:` block as text, in the
block's own indentation, so that every comment and the layout stay as they were; DVC's `foreach` then
sees the new rounds, and no existing stage's params change.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from rlhf.core.config import round_index, round_name
from rlhf.core.errors import UserError
from rlhf.core.io import write_text
from rlhf.core.paths import round_paths


def last_completed(lock: str | Path = "dvc.lock") -> int:
    """The index of the last round whose evaluate stage DVC recorded and whose metrics are on disk (0: none)."""
    lock = Path(lock)
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    done = [round_index(s.split("@", 1)[1]) for s in stages if s.startswith("evaluate@")]
    done = [i for i in done if round_paths(round_name(i)).metrics.is_file()]
    return max(done, default=0)


def with_rounds_upto(text: str, upto: int, source: str = "params.yaml") -> str:
    """params.yaml's text with its `rounds:` block reaching round `upto` (entries added, never removed)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"rounds:\s*(#.*)?$", line)), None)
    if start is None:
        raise UserError(f"{source}: no top-level `rounds:` block to extend")
    entries = []  # (line index, round number) of each `  rNN: rMM` entry of the block
    for i in range(start + 1, len(lines)):
        m = re.match(r"(\s+)r(\d{2,})\s*:", lines[i])
        if m:
            entries.append((i, int(m.group(2)), m.group(1)))
        elif lines[i].strip() and not lines[i].lstrip().startswith("#"):
            break  # the next top-level key
    if not entries:
        raise UserError(f"{source}: `rounds:` must be a block of `rNN: rMM` lines to be extended")
    last_line, last, indent = entries[-1]
    added = "".join(f"{indent}{round_name(i)}: {round_name(i - 1)}\n" for i in range(last + 1, upto + 1))
    if not lines[last_line].endswith("\n"):
        lines[last_line] += "\n"
    return "".join(lines[: last_line + 1]) + added + "".join(lines[last_line + 1 :])


def extend_rounds(more: int, params: str | Path = "params.yaml") -> list[str]:
    """Make params.yaml reach `more` rounds past the last completed one; returns the rounds to run."""
    from rlhf.core.config import load_config

    if more < 1:
        raise UserError(f"--more must be at least 1 (got {more})")
    params = Path(params)
    upto = last_completed() + more
    if upto > len(load_config(params).rounds):
        write_text(params, with_rounds_upto(params.read_text(encoding="utf-8"), upto, str(params)))
    return [round_name(i) for i in range(upto - more + 1, upto + 1)]
