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


def grid(spec: Landscape, gold: np.ndarray, proxy: np.ndarray | None, responses: list[str]) -> dict:
    """The landscape.json of a round from per-sample scores in `prompts` order, `spec.samples` per cell."""
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
    }


def disagreements(land: dict, n: int = 5) -> list[dict]:
    """The n cells where the standardised gold and proxy scores differ most, largest first."""
    if not land.get("proxy"):
        return []
    gold, proxy = np.array(land["gold"]), np.array(land["proxy"])
    z = [(x - x.mean()) / (x.std() or 1.0) for x in (gold, proxy)]
    gap = z[1] - z[0]  # > 0: the proxy likes the cell more than gold does
    (a, values_a), (b, values_b) = land["axes"].items()
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
            }
        )
    return out
