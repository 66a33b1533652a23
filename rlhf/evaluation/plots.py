"""The report's figures (matplotlib, rendered to PNG bytes, no display needed)."""

from __future__ import annotations

import io

from rlhf.evaluation.metrics import lookup


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def figures(rows: list[dict]) -> dict[str, bytes]:
    """Title -> PNG of each plot over the rounds' metrics (rounds lacking a metric are left out of it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    out = {}

    fig, ax = plt.subplots(figsize=(6, 3.5))
    gold = [lookup(r, "gold", "mean") for r in rows]
    ax.errorbar(rounds, gold, yerr=[lookup(r, "gold", "sem") or 0 for r in rows], marker="o", label="gold", capsize=3)
    ax.set_ylabel("gold score")
    proxied = [(r["round"], lookup(r, "proxy", "mean")) for r in rows if lookup(r, "proxy", "mean") is not None]
    if proxied:
        twin = ax.twinx()
        twin.plot(*zip(*proxied), marker="s", color="tab:orange", label="proxy")
        twin.set_ylabel("proxy reward (that round's RM)")
        fig.legend(loc="lower right")
    ax.set_xlabel("round")
    out["Gold and proxy reward per round"] = png(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    d = [lookup(r, "kl", "d") for r in rows]
    ax.plot(d, gold, marker="o")
    for x, y, name in zip(d, gold, rounds):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("d = √KL(policy ‖ reference)")
    ax.set_ylabel("gold score")
    out["Gold against distance from the reference"] = png(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, keys in (
        ("RM accuracy vs gold", ("proxy_accuracy", "mean")),
        ("win rate vs previous round", ("win_rate", "vs_previous", "mean")),
        ("win rate vs SFT", ("win_rate", "vs_sft", "mean")),
    ):
        pts = [(r["round"], lookup(r, *keys)) for r in rows if lookup(r, *keys) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_xlabel("round")
    ax.legend(loc="lower right", fontsize=8)
    out["RM accuracy and win rates (gold, ties count half)"] = png(fig)

    nll = [r for r in rows if lookup(r, "forgetting", "nll") is not None]
    if nll:
        out["Held-out text NLL per round (what the policy forgets; dashed: the SFT policy)"] = forgetting(nll)

    curved = [r for r in rows if isinstance(r.get("curve"), list)]
    if curved:
        out["Gold and proxy against d inside each round (checkpoints, fitted RL form)"] = curves(curved)

    bon = [r for r in rows if r.get("best_of_n")]
    if bon:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r in bon:
            ns = sorted(r["best_of_n"], key=int)
            ax.plot(
                [r["best_of_n"][n].get("kl_bound", r["best_of_n"][n].get("kl")) for n in ns],
                [r["best_of_n"][n]["gold"] for n in ns],
                marker="o",
                label=r["round"],
            )
        ax.set_xlabel("KL bound of best-of-n to the round's policy (log n − (n−1)/n)")
        ax.set_ylabel("gold of the proxy's best of n")
        ax.legend(fontsize=8)
        out["Best-of-n: gold against KL"] = png(fig)
    return out


def landscape(land: dict, rnd: str, marked: list[dict]) -> bytes:
    """Gold and proxy over the landscape grid as two heatmaps, the `marked` cells (where they disagree
    most) outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    (a, rows), (b, cols) = land["axes"].items()
    maps = [("gold", land["gold"]), *([("proxy", land["proxy"])] if land.get("proxy") else [])]
    fig, axes = plt.subplots(
        1, len(maps), figsize=(0.55 * len(cols) * len(maps) + 3, 0.45 * len(rows) + 2), squeeze=False
    )
    for ax, (name, values) in zip(axes[0], maps):
        im = ax.imshow(values, cmap="viridis", aspect="auto")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xlabel(b)
        ax.set_ylabel(a)
        ax.set_title(f"{name} ({rnd})")
        for cell in marked:
            i, j = rows.index(cell[a]), cols.index(cell[b])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    return png(fig)


def curves(rows: list[dict]) -> bytes:
    """Gold (left) and proxy (right) against d = √KL at every checkpoint of every round, one colour per
    round, with the round's fitted RL form d(α − β log d) drawn over its measured d."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("gold", "proxy")):
        curve_panel(ax, rows, key)
    axes[1].set_ylabel("proxy reward (that round's RM)")
    axes[0].legend(fontsize=8)
    return png(fig)


def curve_panel(ax, rows: list[dict], key: str, rounds: list[str] | None = None) -> None:
    """`key` ("gold" or "proxy") against d at each row's curve points, with its fitted RL form; rows are rounds'
    metrics (several may share a round: a study's seeds), coloured by their place in `rounds` (default: the
    rows' own rounds in order), each round labelled once."""
    import matplotlib.pyplot as plt
    import numpy as np

    from rlhf.evaluation import fits

    rounds = rounds or list(dict.fromkeys(r["round"] for r in rows))
    colours, labelled = plt.get_cmap("tab10"), set()
    for r in rows:
        d, colour = [p["d"] for p in r["curve"]], colours(rounds.index(r["round"]) % 10)
        label = None if r["round"] in labelled else r["round"]
        labelled.add(r["round"])
        ax.plot(d, [p[key] for p in r["curve"]], "o", color=colour, label=label, ms=4)
        f = lookup(r, "fits", f"rl_{key}")
        if f and f.get("alpha") is not None and max(d) > 0:
            grid = np.linspace(min(x for x in d if x > 0) / 2, max(d) * 1.1, 60)
            ax.plot(grid, fits.value("rl", f, grid), "-", color=colour, lw=1)
    ax.set_xlabel("d = √KL(checkpoint ‖ reference)")
    ax.set_ylabel(f"{key} score")


def forgetting(rows: list[dict]) -> bytes:
    """The policy's mean token NLL on the held-out text per round, overall and per source, each beside the
    SFT policy's on the same tokens (dashed)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rounds = [r["round"] for r in rows]
    sources = sorted({s for r in rows for s in r["forgetting"].get("sources", {})})
    colours = plt.get_cmap("tab10")
    for k, (label, keys) in enumerate([("all", ()), *((s, ("sources", s)) for s in sources)]):
        nll = [lookup(r, "forgetting", *keys, "nll") for r in rows]
        ax.plot(rounds, nll, marker="o", color=colours(k), label=label)
        ax.plot(rounds, [lookup(r, "forgetting", *keys, "sft_nll") for r in rows], ls="--", color=colours(k), lw=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("mean token NLL (nats)")
    ax.legend(fontsize=8)
    return png(fig)
