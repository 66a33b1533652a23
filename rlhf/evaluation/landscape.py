"""The reward landscape (after QDAIF): prompts built from two user-defined axes (e.g. opener x topic) are
answered by a round's policy and scored by gold and proxy, one cell per pair of axis values.

A proxy that tracks gold ranks the cells as gold does; the cells where the two disagree most (by
standardised score, since the proxy has its own scale) show where the proxy RM is blind.
"""

from __future__ import annotations

import itertools

import numpy as np

from rlhf.core.config import Landscape


def prompts(spec: Landscape) -> list[str]:
    """One prompt per cell, row-major: the first axis varies slowest."""
    (a, values_a), (b, values_b) = spec.axes.items()
    return [spec.template.format(**{a: x, b: y}) for x, y in itertools.product(values_a, values_b)]


def seen(cells: list[str], training: set[str]) -> list[bool]:
    """Which cell prompts are also training prompts (label or policy sets, their last user turn): there the
    proxy RM or the update saw the very prompt, so its score says less about generalisation."""
    return [c.strip() in training for c in cells]


def grid(
    spec: Landscape, gold: np.ndarray, proxy: np.ndarray | None, responses: list[str], seen: list[bool] | None = None
) -> dict:
    """The landscape.json of a round from per-sample scores in `prompts` order, `spec.samples` per cell;
    `seen`: per cell (in `prompts` order), whether it is a training prompt."""
    shape = tuple(len(v) for v in spec.axes.values())

    def cells(scores):
        return None if scores is None else scores.reshape(*shape, spec.samples).mean(-1).round(6).tolist()

    return {
        "template": spec.template,
        "axes": spec.axes,
        "samples": spec.samples,
        "gold": cells(gold),
        "proxy": cells(proxy),
        "responses": np.array(responses, dtype=object)[:: spec.samples].reshape(shape).tolist(),
        "seen": np.zeros(shape, bool).tolist() if seen is None else np.array(seen, bool).reshape(shape).tolist(),
    }


def disagreements(land: dict, n: int = 5) -> list[dict]:
    """The n cells where the standardised gold and proxy scores differ most, largest first."""
    if not land.get("proxy"):
        return []
    gold, proxy = np.array(land["gold"]), np.array(land["proxy"])
    z = [(x - x.mean()) / (x.std() or 1.0) for x in (gold, proxy)]
    gap = z[1] - z[0]  # > 0: the proxy likes the cell more than gold does
    (a, values_a), (b, values_b) = land["axes"].items()
    was_seen = np.array(land.get("seen") or np.zeros(gold.shape, bool), bool)  # older files lack it
    out = []
    for flat in np.argsort(-np.abs(gap), axis=None, kind="stable")[:n]:
        i, j = np.unravel_index(flat, gap.shape)
        out.append(
            {
                a: values_a[i],
                b: values_b[j],
                "gold": float(gold[i, j]),
                "proxy": float(proxy[i, j]),
                "gap": float(gap[i, j]),
                "response": land["responses"][i][j],
                "seen": bool(was_seen[i, j]),
            }
        )
    return out


def seen_means(land: dict) -> dict:
    """Mean gold and proxy over the cells that are training prompts and over the rest: {"seen": {"cells":
    n, "gold": .., "proxy": ..}, "unseen": {...}} (a group without cells has None means)."""
    gold = np.array(land["gold"])
    proxy = np.array(land["proxy"]) if land.get("proxy") else None
    mask = np.array(land.get("seen") or np.zeros(gold.shape, bool), bool)
    out = {}
    for name, m in (("seen", mask), ("unseen", ~mask)):
        n = int(m.sum())
        out[name] = {
            "cells": n,
            "gold": float(gold[m].mean()) if n else None,
            "proxy": float(proxy[m].mean()) if n and proxy is not None else None,
        }
    return out
