"""A study's report: the final round of each configuration ranked by gold (mean and sd over seeds), with where
gold peaks inside a round (Gao et al.'s RL fit, evaluate.checkpoints) and what the policy forgets (held-out
NLL, conversation checks); gold against d = sqrt(KL) per configuration, the curves inside every round per
configuration, and each run's final row (studies/<name>/report/)."""

from __future__ import annotations

import collections
import statistics
from pathlib import Path
from typing import Any

from rlhf.core.io import write_text
from rlhf.evaluation.metrics import WORSE, lookup, number
from rlhf.evaluation.report import metrics_rows
from rlhf.studies.grid import Study, label_of, short_names

# A column of the ranked table (and of runs.csv) -> where a round's metrics.json holds it; the table shows the
# mean over the seeds that finished.
SUMMARY = {
    "gold": ("gold", "mean"),
    "proxy": ("proxy", "mean"),
    "kl": ("kl", "per_sequence"),
    "d": ("kl", "d"),
    "rm_accuracy": ("proxy_accuracy", "mean"),
    "peak_d": ("fits", "rl_gold", "d_peak"),
    "peak_gold": ("fits", "rl_gold", "value_peak"),
    "nll": ("forgetting", "nll"),
    "sft_nll": ("forgetting", "sft_nll"),
    "delta_nll": ("forgetting", "delta_nll"),
    "conversational": ("conversation", "conversational"),
}


def peak(m: dict) -> tuple[float, float, float, float] | None:
    """(d, gold, and d's 95% interval) where the round's RL fit puts gold's peak, when the whole interval lies
    inside the d its checkpoints measured; None otherwise: gold still rising (or already falling) at every
    checkpoint, or a peak the curve cannot place, where the fitted one is an extrapolation that can run to any d
    (one seed's 1e5 would swamp a mean over seeds). A round fitted before the intervals: its peak inside."""
    f = lookup(m, "fits", "rl_gold") or {}
    d, gold = number(f, "d_peak"), number(f, "value_peak")
    inside = f.get("peak_where", "uncertain" if "outside" in f.get("note", "") else "inside") == "inside"
    return (d, gold, f.get("d_peak_low", d), f.get("d_peak_high", d)) if inside and None not in (d, gold) else None


def mean_peak(ms: list[dict]) -> tuple[float, float, float, float, int] | None:
    """The mean (d, gold, d's interval bounds) over the rounds `ms` whose peak lies inside their measured d,
    and how many do."""
    found = [p for m in ms if (p := peak(m))]
    return (*(statistics.fmean(p[i] for p in found) for i in range(4)), len(found)) if found else None


def axis_names(study: Study) -> list[str]:
    return list(short_names(list(study.spec.axes)).values())


def run_alarms(study: Study, run) -> list[str]:
    """The alarms saying a round of the run made things worse (regressions, KL spikes), each named by round; the
    others (a dip inside a round's curve, ...) are in the run's own report."""
    rows = metrics_rows(study.rounds, run.folder)
    return [f"{m['round']}: {a}" for m in rows for a in m.get("alarms", []) if a.startswith(WORSE)]


def final_rows(study: Study) -> list[dict]:
    """One row per configuration, ranked by gold: its final round over the seeds that finished it."""
    names = short_names(list(study.spec.axes))
    rows = []
    for config, runs in study.configs.items():
        finals = [m for r in runs for m in metrics_rows([study.rounds[-1]], r.folder)]
        row: dict[str, Any] = {names[k]: label_of(v) for k, v in runs[0].values.items()}
        row["seeds"] = f"{len(finals)}/{len(runs)}"
        row["alarmed"] = sum(bool(run_alarms(study, r)) for r in runs)
        for name, keys in SUMMARY.items():
            xs = [x for m in finals if (x := number(m, *keys)) is not None]
            row[name] = statistics.fmean(xs) if xs else None
            if name == "gold":
                row["gold_sd"] = statistics.stdev(xs) if len(xs) > 1 else None
        # the peak over the seeds whose fit found it inside the d they measured (how many, when not all)
        found = mean_peak(finals) or (None, None, None, None, 0)
        row["peak_d"], row["peak_gold"], row["peak_d_low"], row["peak_d_high"], row["peaks"] = found
        row["peaks_of"] = len(finals)
        rows.append({"configuration": config, **row})
    rows.sort(key=lambda r: -r["gold"] if r["gold"] is not None else float("inf"))
    return [{"rank": i if r["gold"] is not None else None, **r} for i, r in enumerate(rows, 1)]


def num(x, f: str = ".3f") -> str:
    """A table cell: the number formatted, or – where there is none."""
    return "–" if x is None else format(x, f)


def markdown_table(rows: list[dict], axes: list[str]) -> str:
    head = ["rank", *axes, "seeds", "gold ± sd", "proxy", "KL", "RM acc", "peak d", "peak gold", "NLL (Δ SFT)", "conv."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gold = "–" if r["gold"] is None else f"**{r['gold']:.3f}** ± {num(r['gold_sd'])}"
        seen = f" ({r['peaks']}/{r['peaks_of']})" if 0 < r.get("peaks", 0) < r.get("peaks_of", 0) else ""
        interval = f" [{r['peak_d_low']:.2f}, {r['peak_d_high']:.2f}]" if r.get("peak_d") is not None else ""
        peak = num(r.get("peak_d")) + interval + seen
        nll = "–" if r.get("nll") is None else f"{r['nll']:.3f} ({num(r.get('delta_nll'), '+.3f')})"
        cells = [
            str(r["rank"] or "–"),
            *(str(r[a]) for a in axes),
            r["seeds"] + (f" ⚠{r['alarmed']}" if r.get("alarmed") else ""),
            gold,
            num(r["proxy"]),
            num(r["kl"]),
            num(r["rm_accuracy"]),
            peak,
            num(r.get("peak_gold")),
            nll,
            num(r.get("conversational"), ".0%"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# What the axis table sets against seed noise: a run's final gold, and how much held-out text it forgot.
EFFECTS = {"gold": "final gold", "delta_nll": "Δ NLL"}


def seed_noise(runs: list[dict], key: str) -> float | None:
    """The sd of `key` between the seeds of one configuration, pooled over configurations (None under 2 seeds)."""
    by_config: dict[str, list[float]] = {}
    for r in runs:
        if r.get(key) is not None:
            by_config.setdefault(r["configuration"], []).append(r[key])
    dof = sum(len(xs) - 1 for xs in by_config.values())
    return (sum(statistics.variance(xs) * (len(xs) - 1) for xs in by_config.values()) / dof) ** 0.5 if dof else None


def level_effects(runs: list[dict], axes: list[str]) -> tuple[list[dict], dict[str, float | None]]:
    """Each axis level's final gold and Δ NLL averaged over every run that has it (the other axes and the
    seeds), and each one's seed noise. `runs`: one dict per finished run, its axis values under `axes`, its
    `configuration`, `gold` and `delta_nll`."""
    levels = []
    for axis in axes:
        for level in dict.fromkeys(r[axis] for r in runs):
            mine = [r for r in runs if r[axis] == level]
            lv = {"axis": axis, "level": level, "runs": len(mine)}
            for key in EFFECTS:
                xs = [r[key] for r in mine if r.get(key) is not None]
                lv |= {key: statistics.fmean(xs) if xs else None, f"{key}_n": len(xs)}
                lv[f"{key}_sd"] = statistics.stdev(xs) if len(xs) > 1 else None
            levels.append(lv)
    return levels, {key: seed_noise(runs, key) for key in EFFECTS}


def effects_section(levels: list[dict], noise: dict[str, float | None]) -> str:
    """The levels table and, per axis and measure, whether its highest and lowest levels differ beyond seed
    noise: their gap against the standard error of a difference of two means of n runs, noise·√(2/n)
    (unpaired, so cautious: levels share seeds). '' without seed noise in gold to compare with."""
    if noise["gold"] is None or not levels:
        return ""
    lines = ["| axis | level | runs | gold ± sd | Δ NLL |", "|---|---|---|---|---|"]
    for lv in levels:
        lines.append(
            f"| {lv['axis']} | {lv['level']} | {lv['runs']} | {lv['gold']:.3f} ± {num(lv['gold_sd'])} | "
            f"{num(lv['delta_nll'], '+.3f')} |"
        )
    said = ", ".join(f"{name} {noise[key]:.3f}" for key, name in EFFECTS.items() if noise[key] is not None)
    lines += ["", f"Seed noise (the sd between the seeds of one configuration, pooled): {said}.", ""]
    for axis in dict.fromkeys(lv["axis"] for lv in levels):
        for key, name in EFFECTS.items():
            mine = sorted((lv for lv in levels if lv["axis"] == axis and lv[key] is not None), key=lambda lv: -lv[key])
            if noise[key] is None or len(mine) < 2:
                continue
            n = min(lv[f"{key}_n"] for lv in mine)
            gap, se = mine[0][key] - mine[-1][key], noise[key] * (2 / n) ** 0.5
            verdict = "beyond seed noise" if gap > 2 * se else "within seed noise"
            size = f"{gap / se:.1f} standard errors ({se:.3f})" if se else "the seeds agree exactly"
            lines.append(f"- {axis}, {name}: {mine[0]['level']} − {mine[-1]['level']} = {gap:.3f}, {size}: {verdict}.")
    return "\n".join(lines)


def peaks_by_round(study: Study) -> str:
    """Where gold peaks inside each round, per configuration (the mean over seeds of the RL fit's peak gold and
    its d): the across-round trend Wolf et al. compare iterations by. '' when no round has a fit."""
    rounds, cells = study.rounds[1:], {}
    for config, runs in study.configs.items():
        cells[config] = []
        for rnd in rounds:
            ms = [m for r in runs for m in metrics_rows([rnd], r.folder)]
            p = mean_peak(ms)
            seen = f" ({p[4]}/{len(ms)})" if p and p[4] < len(ms) else ""
            cells[config].append(f"{p[1]:.3f} at d {p[0]:.2f} [{p[2]:.2f}, {p[3]:.2f}]{seen}" if p else "–")
    if all(c == "–" for row in cells.values() for c in row):
        return ""
    lines = ["| configuration | " + " | ".join(rounds) + " |", "|" + "---|" * (len(rounds) + 1)]
    return "\n".join([*lines, *(f"| {config} | " + " | ".join(row) + " |" for config, row in cells.items())])


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
            ms = [
                m
                for r in runs
                for m in metrics_rows([rnd], r.folder)
                if number(m, "kl", "d") is not None and number(m, "gold", "mean") is not None
            ]
            if ms:
                points.append(
                    (statistics.fmean(m["kl"]["d"] for m in ms), statistics.fmean(m["gold"]["mean"] for m in ms))
                )
        if points:
            ax.plot(*zip(*points), marker="o", label=config)
    ax.set_xlabel("d = √KL(policy ‖ reference)")
    ax.set_ylabel("gold score (mean over seeds)")
    ax.set_title(f"{study.folder.name}: gold against distance, r00 … {study.rounds[-1]}")
    if ax.lines:
        ax.legend(fontsize=7, loc="best")
    return png(fig)


def curves_png(study: Study) -> bytes | None:
    """Gold against d at every checkpoint of every round, one panel per configuration, one colour per round,
    every seed's points with its fitted RL curve (evaluate.checkpoints); None when no run has curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf.evaluation.plots import curve_panel, png

    rows = {
        config: [m for r in runs for m in metrics_rows(study.rounds[1:], r.folder) if isinstance(m.get("curve"), list)]
        for config, runs in study.configs.items()
    }
    if not any(rows.values()):
        return None
    cols = min(3, len(rows))
    n = -(-len(rows) // cols)
    fig, axes = plt.subplots(n, cols, figsize=(4.2 * cols, 3.4 * n), squeeze=False, sharey=True, layout="constrained")
    for ax, (config, ms) in zip(axes.flat, rows.items()):
        curve_panel(ax, ms, "gold", study.rounds[1:])
        ax.set_title(config, fontsize=9)
    for ax in list(axes.flat)[len(rows) :]:
        ax.set_visible(False)
    axes[0][0].legend(fontsize=7)
    return png(fig)


def commits_line(study: Study) -> list[str]:
    """The commits the runs ran (a pool study's records name them), and a warning when they differ."""
    ran = collections.Counter(f.read_text().strip()[:12] for r in study.runs if (f := r.folder / "commit").is_file())
    if len(ran) > 1:
        each = ", ".join(f"{commit} ({n} run{'s' * (n > 1)})" for commit, n in ran.most_common())
        return [f"⚠ The runs ran different commits: {each}; rows from different code may not compare.", ""]
    return [f"Every run with a record ran commit {next(iter(ran))}.", ""] if ran else []


def write_report(study: Study) -> Path:
    """studies/<name>/report/: report.md (the ranked final-round table, the peaks per round and the plots),
    gold_vs_d.png, curves.png (with evaluate.checkpoints), and runs.csv (each run's final round). Offline:
    nothing to fetch."""
    import csv

    out = study.folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = final_rows(study)
    (out / "gold_vs_d.png").write_bytes(gold_vs_d_png(study))
    sft = [m["gold"]["mean"] for r in study.runs for m in metrics_rows(["r00"], r.folder)]
    text = [
        f"# Study {study.folder.name}",
        "",
        f"{study.describe()}. Final round {study.rounds[-1]}; gold is the judge's mean score on held-out prompts "
        "(± the sd over seeds), proxy the final RM's, KL per sequence to the reference, RM acc the proxy's "
        "pairwise agreement with gold; peak d and peak gold where Gao et al.'s RL "
        "form fitted to the round's checkpoints puts gold's peak (evaluate.checkpoints), the mean over the seeds "
        "whose peak's 95% interval [in brackets] lies inside the d they measured ((k/n): k of n seeds; –: none, "
        "gold still rising or already falling at every checkpoint, or a peak the points cannot place); NLL the "
        "mean token NLL on held-out general text (Δ: less the SFT "
        "policy's, > 0: forgotten), conv. the share of conversation-check answers that stay conversational. "
        "Ranked by gold.",
        "",
        markdown_table(rows, axis_names(study)),
        "",
    ]
    if sft:
        text += [f"The SFT policy (r00) scores gold {statistics.fmean(sft):.3f} (mean over {len(sft)} runs).", ""]
    text += commits_line(study)
    finals = [(r, m) for r in study.runs for m in metrics_rows([study.rounds[-1]], r.folder)]
    names, axes = short_names(list(study.spec.axes)), axis_names(study)
    effects = effects_section(
        *level_effects(
            [
                {
                    **{names[k]: label_of(v) for k, v in r.values.items()},
                    "configuration": r.config,
                    "gold": number(m, *SUMMARY["gold"]),
                    "delta_nll": number(m, *SUMMARY["delta_nll"]),
                }
                for r, m in finals
                if number(m, *SUMMARY["gold"]) is not None
            ],
            axes,
        )
    )
    alarms = {r.id: run_alarms(study, r) for r in study.runs}  # each run's rounds read once, for both uses below
    alarmed = [(r, alarms[r.id]) for r in study.runs if alarms[r.id]]
    if alarmed:
        text += [
            f"Rounds that made things worse (⚠n in the table: n of a configuration's runs had one), {len(alarmed)} "
            "runs (every alarm is in each run's own report):",
            "",
        ]
        text += [f"- {r.id}: " + "; ".join(said) for r, said in alarmed] + [""]
    if effects:
        text += ["Each axis's levels, averaged over the other axes and the seeds (final round):", "", effects, ""]
    if peaks := peaks_by_round(study):
        text += [
            "Where gold peaks inside each round (peak gold at d [d's 95% interval], mean over the seeds with a "
            "peak inside the d they measured):",
            "",
            peaks,
            "",
        ]
    text += ["![gold against d = √KL, one line per configuration](gold_vs_d.png)", ""]
    (out / "curves.png").unlink(missing_ok=True)  # an earlier report's, when no run has curves any more
    if (curves := curves_png(study)) is not None:
        (out / "curves.png").write_bytes(curves)
        text += ["![gold against d at every checkpoint of every round, one panel per configuration](curves.png)", ""]
    write_text(out / "report.md", "\n".join(text))
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "configuration", "seed", *SUMMARY, "alarms"])
        for r, m in finals:
            w.writerow([r.id, r.config, r.seed, *(lookup(m, *k) for k in SUMMARY.values()), len(alarms[r.id])])
    return out / "report.md"
