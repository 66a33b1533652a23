"""The per-round metrics table that `rlhf run` and `rlhf metrics` print, and the per-round summaries the
flow publishes as Prefect artifacts."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.core.paths import round_paths
from rlhf.evaluation import forgetting, harness
from rlhf.evaluation.metrics import number

# KL/seq: the mean over the held-out samples of each one's KL to the reference (an estimate: ±KL its sem)
COLUMNS = ("round", "gold", "±sem", "best", "proxy", "RM acc", "KL/seq", "±KL", "KL/token", "length")


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
        [
            r["round"],
            r["gold"]["mean"],
            r["gold"]["sem"],
            r["gold"]["best"],
            r.get("proxy", {}).get("mean"),
            r.get("proxy_accuracy", {}).get("mean"),
            r["kl"]["per_sequence"],
            r["kl"].get("per_sequence_sem"),
            r["kl"]["per_token"],
            r["length"],
        ]
        for r in rows
    ]
    table = [list(COLUMNS)] + [[fmt(c) for c in row] for row in cells]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def flat(metrics: dict, prefix: str = "") -> list[dict]:
    """A round's metrics as rows of (metric, value), nested keys joined by dots: a Prefect table artifact."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += flat(value, f"{name}.")
        elif isinstance(value, list):
            rows += [{"metric": f"{name}[{i}]", "value": str(v)} for i, v in enumerate(value)]
        else:
            rows.append({"metric": name, "value": value})
    return rows


def round_markdown(metrics: dict, samples: list[dict], n_samples: int = 3) -> str:
    """A round in a few lines: scores, KL, win rates, alarms and some held-out answers."""

    def num(x, f=".3f"):
        return "–" if x is None else format(x, f)

    g, kl = metrics["gold"], metrics["kl"]
    lines = [
        f"## Round {metrics['round']}",
        "",
        f"- gold **{num(g['mean'])}** ± {num(g.get('sem'))} (n={g['count']}, best {num(g.get('best'))})",
        f"- proxy {num(metrics.get('proxy', {}).get('mean'))}, RM accuracy vs gold "
        f"{num(metrics.get('proxy_accuracy', {}).get('mean'))}",
        f"- KL to the reference {num(kl['per_sequence'])} ± {num(kl.get('per_sequence_sem'))} per sequence, "
        f"estimated over {kl.get('samples', g['count'])} sampled responses (d = √KL = {num(kl.get('d'))} ± "
        f"{num(kl.get('d_sem'))})",
    ]
    for name, w in metrics.get("win_rate", {}).items():
        lines.append(
            f"- win rate {name.replace('_', ' ')}: {num(w['mean'])}" + (f" ({w['missing']})" if "missing" in w else "")
        )
    lines += [f"- fit {line}" for line in fit_lines(metrics)]
    lines += [f"- {line}" for line in forgetting.lines(metrics)]
    lines += [f"- **alarm**: {a}" for a in metrics.get("alarms", [])]
    lines += ["", "| prompt | response | gold |", "|---|---|---|"]
    lines += [
        f"| {r['prompt']} | {r['response'].strip() or '(empty)'} | {r['gold']:.3f} |" for r in samples[:n_samples]
    ]
    return "\n".join(lines)


def fit_lines(metrics: dict) -> list[str]:
    """One line per fitted form of a round (metrics["fits"]: rlhf/evaluation/fits.py)."""
    from rlhf.evaluation.fits import describe

    names = {
        "rl_gold": "RL, gold",
        "rl_proxy": "RL, proxy",
        "bon_gold": "best-of-n, gold",
        "bon_proxy": "best-of-n, proxy",
    }
    found = metrics.get("fits") or {}
    return [describe(name, found[key]) for key, name in names.items() if key in found]


CSV_COLUMNS = {
    "gold": ("gold", "mean"),
    "gold_sem": ("gold", "sem"),
    "proxy": ("proxy", "mean"),
    "rm_accuracy": ("proxy_accuracy", "mean"),
    "kl": ("kl", "per_sequence"),
    "d": ("kl", "d"),
    "win_vs_previous": ("win_rate", "vs_previous", "mean"),
    "win_vs_sft": ("win_rate", "vs_sft", "mean"),
    "mmd": ("mmd",),
    "length": ("length",),
    "nll": ("forgetting", "nll"),
    "delta_nll": ("forgetting", "delta_nll"),
    "conversational": ("conversation", "conversational"),
}


def write_report(rounds: list[str], out: str | Path = "reports", project: str | Path = ".") -> Path:
    """An offline report of the rounds run so far: report.html (plots embedded as PNG, no network needed),
    the PNGs themselves, and rounds.csv (one row per round; dvc.yaml's plots read it)."""
    import base64
    import csv
    import html

    from rlhf.core.io import read_jsonl
    from rlhf.evaluation.plots import figures

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = metrics_rows(rounds, project)
    with open(out / "rounds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", *CSV_COLUMNS])
        w.writerows(
            [[r["round"], *("" if (v := number(r, *k)) is None else v for k in CSV_COLUMNS.values())] for r in rows]
        )
    parts = [f"<h1>Iterated RLHF: {len(rows)} rounds</h1>", f"<pre>{html.escape(metrics_table(rows))}</pre>"]
    for i, (title, png) in enumerate(figures(rows).items()):
        (out / f"plot{i}.png").write_bytes(png)
        parts.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        )
    fitted = [f"<li><b>{r['round']}</b>: {html.escape(line)}</li>" for r in rows for line in fit_lines(r)]
    if fitted:
        parts.append(
            "<h2>Fits (Gao et al.: RL d(α − β log d), best-of-n d(α − β d), gain over the reference)</h2><ul>"
            + "".join(fitted)
            + "</ul>"
        )
    parts.append(_landscape_section([r["round"] for r in rows], project, out))
    parts.append(_forgetting_section(rows))
    notes = [f"<li><b>{r['round']}</b>: {html.escape(a)}</li>" for r in rows for a in r.get("alarms", [])]
    notes += [
        f"<li><b>{r['round']}</b>: {r['too_long']['prompts']} held-out prompts over prompts.max_prompt_length "
        f"({'dropped' if r['too_long']['action'] == 'drop' else 'cut to their last tokens'})</li>"
        for r in rows
        if r.get("too_long")
    ]
    notes += [
        f"<li><b>{r['round']}</b>: {html.escape(name)} missing: {html.escape(item['missing'])}</li>"
        for r in rows
        for name, item in _missing(r)
    ]
    parts.append("<h2>Alarms and missing metrics</h2><ul>" + ("".join(notes) or "<li>none</li>") + "</ul>")
    samples = {
        r["round"]: read_jsonl(p) for r in rows if (p := round_paths(r["round"], project).eval_samples).is_file()
    }
    parts.append(_samples_table(samples))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Iterated RLHF report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:auto} td,th{border:1px solid #ccc;padding:4px;"
        "vertical-align:top;font-size:13px} table{border-collapse:collapse}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>"
    )
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.html"


def _landscape_section(rounds: list[str], project: str | Path, out: Path) -> str:
    """Heatmaps of gold and proxy over the landscape grid of the last round that has one, and the cells
    where they disagree most."""
    import base64
    import html

    from rlhf.evaluation import landscape, plots

    for rnd in reversed(rounds):
        path = round_paths(rnd, project).landscape
        land = json.loads(path.read_text()) if path.is_file() else {}
        if land.get("axes") and land.get("proxy"):
            break
    else:
        return ""
    worst = landscape.disagreements(land)
    png = plots.landscape(land, rnd, worst)
    (out / "landscape.png").write_bytes(png)
    a, b = land["axes"]
    rows = "".join(
        f"<tr><td>{html.escape(c[a])}</td><td>{html.escape(c[b])}{' (training prompt)' if c['seen'] else ''}</td>"
        f"<td>{c['gold']:.3f}</td>"
        f"<td>{c['proxy']:.3f}</td><td>{c['gap']:+.2f}</td><td>{html.escape(c['response'].strip())}</td></tr>"
        for c in worst
    )
    return (
        f"<h2>Reward landscape ({rnd})</h2><p>Prompts <code>{html.escape(land['template'])}</code>, "
        f"{land['samples']} samples per cell. Outlined: where gold and proxy disagree most (gap = "
        "standardised proxy − standardised gold; &gt; 0: the proxy overrates the cell).</p>"
        f"<img alt='reward landscape' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        f"<p>{_seen_line(landscape.seen_means(land))}</p>"
        f"<table><tr><th>{html.escape(a)}</th><th>{html.escape(b)}</th><th>gold</th><th>proxy</th><th>gap</th>"
        f"<th>a sample</th></tr>{rows}</table>"
    )


def _forgetting_section(rows: list[dict]) -> str:
    """What the policy forgets, per round (rlhf/evaluation/forgetting.py): held-out text NLL against the SFT
    policy's, the conversation checks and lm_eval's scores; then the first answer to a few checks per round."""
    rows = [r for r in rows if r.get("forgetting") or r.get("conversation") or r.get("lm_eval")]
    if not rows:
        return ""
    return (
        "<h2>What the policy forgets</h2><p>Mean token NLL (nats) on held-out general text no step trains on "
        "(<code>evaluate.heldout</code>) against the SFT policy's on the same tokens (Δ &gt; 0: the policy fits "
        "it worse than SFT did); the conversation checks (<code>evaluate.conversation_checks</code>): the share "
        "of answers that end, are not empty and do not repeat themselves (seq-rep-4 ≤ 0.5), and their gold.</p>"
        + _html_table(*forgetting_table(rows))
        + _check_answers(rows)
    )


def forgetting_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The header and one row of cells per round: NLL, perplexity, the SFT policy's NLL, Δ (overall and per
    source), the conversation checks, and each lm_eval task's metrics."""

    def num(x, f=".3f"):
        return "–" if x is None else format(x, f)

    sources = sorted({s for r in rows for s in (r.get("forgetting") or {}).get("sources", {})})
    tasks = sorted({(t, m) for r in rows for t, ms in (r.get("lm_eval") or {}).items() for m in harness.scores(ms)})
    head = ["round", "NLL", "ppl", "SFT NLL", "Δ NLL", *(f"Δ NLL {s}" for s in sources)]
    head += ["conversational", "ended", "seq-rep-4", "checks gold", *(f"{t} {m}" for t, m in tasks)]
    cells = []
    for r in rows:
        f, c = r.get("forgetting") or {}, r.get("conversation") or {}
        cells.append(
            [r["round"], num(f.get("nll")), num(f.get("ppl"), ".2f"), num(f.get("sft_nll"))]
            + [
                num(number(f, "delta_nll"), "+.3f"),
                *(num(number(f, "sources", s, "delta_nll"), "+.3f") for s in sources),
            ]
            + [num(c.get("conversational"), ".0%"), num(c.get("ended"), ".0%"), num(c.get("repetition"), ".2f")]
            + [num(c.get("gold")), *(num(number(r, "lm_eval", t, m)) for t, m in tasks)]
        )
    return head, cells


def _html_table(head: list[str], cells: list[list[str]]) -> str:
    import html

    rows = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in row) + "</tr>" for row in cells)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + rows + "</table>"


def _check_answers(rows: list[dict], n_checks: int = 6) -> str:
    """The first answer to the first few conversation checks, one column per round (as one would check by hand)."""
    import html

    examples = {r["round"]: {e["id"]: e for e in (r.get("conversation") or {}).get("examples", [])} for r in rows}
    ids = list(dict.fromkeys(i for ex in examples.values() for i in ex))[:n_checks]
    if not ids:
        return ""

    def cell(e: dict | None) -> str:
        if e is None:
            return "<td>–</td>"
        verdict = f"{'' if e['conversational'] else 'not '}conversational, gold {e['gold']:.2f}"
        return f"<td>{html.escape(e['response'].strip() or '(empty)')}<br><i>{verdict}</i></td>"

    head = "".join(f"<th>{html.escape(rnd)}</th>" for rnd in examples)
    body = "".join(
        f"<tr><td>{html.escape(i)}</td>" + "".join(cell(ex.get(i)) for ex in examples.values()) + "</tr>" for i in ids
    )
    return f"<h3>Conversation checks: the first answer per round</h3><table><tr><th>check</th>{head}</tr>{body}</table>"


def _seen_line(means: dict) -> str:
    """Mean gold and proxy over the cells that are training prompts and over the rest."""

    def num(x):
        return "-" if x is None else f"{x:.3f}"

    return "; ".join(
        f"{label}: {m['cells']} cells, mean gold {num(m['gold'])}, proxy {num(m['proxy'])}"
        for label, m in (("training prompts", means["seen"]), ("unseen prompts", means["unseen"]))
    )


def _missing(m: dict, prefix: str = ""):
    for key, value in m.items():
        if isinstance(value, dict):
            if "missing" in value:
                yield prefix + key, value
            else:
                yield from _missing(value, f"{prefix}{key}.")


def _samples_table(samples: dict[str, list[dict]], n_prompts: int = 4) -> str:
    """The first sample of the first few held-out prompts, one column per round, with its gold score."""
    import html

    if not samples:
        return ""
    first = {name: {} for name in samples}
    for name, rows in samples.items():
        for r in rows:
            first[name].setdefault(r["prompt_id"], r)
    prompts = list(next(iter(first.values())).values())[:n_prompts]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in samples)
    body = "".join(
        f"<tr><td>{html.escape(p['prompt'])}</td>"
        + "".join(
            f"<td>{html.escape(first[n].get(p['prompt_id'], {}).get('response', '').strip() or '(empty)')}"
            f"<br><i>gold {first[n].get(p['prompt_id'], {}).get('gold', float('nan')):.2f}</i></td>"
            for n in samples
        )
        + "</tr>"
        for p in prompts
    )
    return f"<h2>Sample responses</h2><table><tr><th>prompt</th>{head}</tr>{body}</table>"
