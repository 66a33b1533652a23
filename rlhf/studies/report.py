"""A study's report: the final round of each configuration ranked by gold (mean and sd over seeds), gold
against d = sqrt(KL) per configuration, and each run's final row (studies/<name>/report/)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rlhf.core.io import write_text
from rlhf.evaluation.metrics import lookup, number
from rlhf.evaluation.report import metrics_rows
from rlhf.studies.grid import Study, label_of, short_names


def axis_names(study: Study) -> list[str]:
    return list(short_names(list(study.spec.axes)).values())


def final_rows(study: Study) -> list[dict]:
    """One row per configuration, ranked by gold: its final round over the seeds that finished it."""
    names = short_names(list(study.spec.axes))
    rows = []
    for config, runs in study.configs.items():
        finals = [m for r in runs for m in metrics_rows([study.rounds[-1]], r.folder)]
        row: dict[str, Any] = {names[k]: label_of(v) for k, v in runs[0].values.items()}
        row["seeds"] = f"{len(finals)}/{len(runs)}"
        for name, keys in (("gold", ("gold", "mean")), ("proxy", ("proxy", "mean")), ("kl", ("kl", "per_sequence")),
                           ("d", ("kl", "d")), ("rm_accuracy", ("proxy_accuracy", "mean"))):
            xs = [x for m in finals if (x := number(m, *keys)) is not None]
            row[name] = statistics.fmean(xs) if xs else None
            if name == "gold":
                row["gold_sd"] = statistics.stdev(xs) if len(xs) > 1 else None
        rows.append({"configuration": config, **row})
    rows.sort(key=lambda r: -r["gold"] if r["gold"] is not None else float("inf"))
    return [{"rank": i if r["gold"] is not None else None, **r} for i, r in enumerate(rows, 1)]


def markdown_table(rows: list[dict], axes: list[str]) -> str:
    def num(x):
        return "–" if x is None else f"{x:.3f}"

    head = ["rank", *axes, "seeds", "gold ± sd", "proxy", "KL", "RM acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gold = "–" if r["gold"] is None else f"**{r['gold']:.3f}** ± {num(r['gold_sd'])}"
        cells = [str(r["rank"] or "–"), *(str(r[a]) for a in axes), r["seeds"], gold, num(r["proxy"]), num(r["kl"]),
                 num(r["rm_accuracy"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gold_vs_d_png(study: Study) -> bytes:
    """Gold against d = √KL over the rounds, one line per configuration (the mean over its seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf.evaluation.plots import png
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config, runs in study.configs.items():
        points = []
        for rnd in study.rounds:
            ms = [m for r in runs for m in metrics_rows([rnd], r.folder)
                  if number(m, "kl", "d") is not None and number(m, "gold", "mean") is not None]
            if ms:
                points.append((statistics.fmean(m["kl"]["d"] for m in ms), statistics.fmean(m["gold"]["mean"] for m in ms)))
        if points:
            ax.plot(*zip(*points), marker="o", label=config)
    ax.set_xlabel("d = √KL(policy ‖ reference)")
    ax.set_ylabel("gold score (mean over seeds)")
    ax.set_title(f"{study.folder.name}: gold against distance, r00 … {study.rounds[-1]}")
    if ax.lines:
        ax.legend(fontsize=7, loc="best")
    return png(fig)


def write_report(study: Study) -> Path:
    """studies/<name>/report/: report.md (the ranked final-round table and the plot), gold_vs_d.png, and
    runs.csv (each run's final round). Offline: nothing to fetch."""
    import csv

    out = study.folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = final_rows(study)
    (out / "gold_vs_d.png").write_bytes(gold_vs_d_png(study))
    sft = [m["gold"]["mean"] for r in study.runs for m in metrics_rows(["r00"], r.folder)]
    text = [f"# Study {study.folder.name}", "", f"{study.describe()}. Final round {study.rounds[-1]}; gold is the judge's "
            "mean score on held-out prompts (± the sd over seeds), proxy the final RM's, KL per sequence to the "
            "reference, RM acc the proxy's pairwise agreement with gold. Ranked by gold.", "",
            markdown_table(rows, axis_names(study)), ""]
    if sft:
        text += [f"The SFT policy (r00) scores gold {statistics.fmean(sft):.3f} (mean over {len(sft)} runs).", ""]
    text += ["![gold against d = √KL, one line per configuration](gold_vs_d.png)", ""]
    write_text(out / "report.md", "\n".join(text))
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "configuration", "seed", "gold", "proxy", "kl", "d", "rm_accuracy"])
        for r in study.runs:
            for m in metrics_rows([study.rounds[-1]], r.folder):
                w.writerow([r.id, r.config, r.seed, *(lookup(m, *k) for k in (("gold", "mean"), ("proxy", "mean"),
                            ("kl", "per_sequence"), ("kl", "d"), ("proxy_accuracy", "mean")))])
    return out / "report.md"
