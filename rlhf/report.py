"""The per-round metrics table that `rlhf run` and `rlhf metrics` print."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.paths import round_paths

COLUMNS = ("round", "gold", "±sem", "best", "proxy", "RM acc", "KL/seq", "KL/token", "length")


def metrics_rows(rounds: list[str], project: str | Path = ".") -> list[dict]:
    rows = []
    for rnd in rounds:
        path = round_paths(rnd, project).metrics
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    return rows


def metrics_table(rows: list[dict]) -> str:
    def fmt(x) -> str:
        return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    cells = [
        [r["round"], r["gold"]["mean"], r["gold"]["sem"], r["gold"]["best"], r.get("proxy", {}).get("mean"),
         r.get("proxy_accuracy", {}).get("mean"), r["kl"]["per_sequence"], r["kl"]["per_token"], r["length"]]
        for r in rows
    ]
    table = [list(COLUMNS)] + [[fmt(c) for c in row] for row in cells]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
