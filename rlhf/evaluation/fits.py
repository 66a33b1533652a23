"""Gao et al. (2022)'s scaling forms fitted to a round's over-optimisation curve, pure numpy.

Gold (or proxy) gain over the reference, as a function of d = sqrt(KL(policy || reference)):
- RL:        R(d) = d (alpha - beta log d), peak at d* = exp(alpha/beta - 1) when beta > 0;
- best-of-n: R(d) = d (alpha - beta d),     peak at d* = alpha / (2 beta) when beta > 0.
Both are linear in (alpha, beta) once divided by d (R/d = alpha - beta log d, or alpha - beta d), so a
closed-form least-squares solve fits them; R^2 is reported on R itself. The gain is the score less a
`baseline` (the reference's own score, where R(0) = 0); without one, the scores are fitted as they are.
"""

from __future__ import annotations

import math

import numpy as np

POOR_R2 = 0.5  # below: the form does not describe the curve, say so beside the numbers


def fit(form: str, d, y, baseline: float = 0.0) -> dict:
    """Fit `form` ("rl" or "bon") to scores `y` at distances `d` (points with d <= 0 are left out).
    Returns alpha, beta, d_peak, value_peak (baseline added back), r2, points, and `note` when the fit is
    poor, has no peak, or peaks outside the measured range of d; or {"missing": reason}."""
    d, y = np.asarray(d, dtype=np.float64), np.asarray(y, dtype=np.float64) - baseline
    keep = (d > 0) & np.isfinite(d) & np.isfinite(y)
    d, y = d[keep], y[keep]
    if len(d) < 2 or np.ptp(d) == 0:
        return {"alpha": None, "beta": None, "missing": f"{len(d)} distinct points with d > 0: too few to fit"}
    shape = np.log(d) if form == "rl" else d
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([np.ones_like(d), -shape], 1), y / d, rcond=None)
    predicted = d * (alpha - beta * shape)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((y - predicted) ** 2).sum()) / total if total > 0 else None
    out = {"form": form, "alpha": float(alpha), "beta": float(beta), "r2": r2, "points": int(len(d))}
    out["baseline"] = float(baseline)
    notes = []
    # exp of a huge alpha/beta: a peak so far out it is no peak (and would not survive JSON as inf)
    if beta > 0 and (form != "rl" or alpha / beta - 1 < 50):
        peak = math.exp(alpha / beta - 1) if form == "rl" else alpha / (2 * beta)
        out["d_peak"] = peak
        log_peak = math.log(peak) if peak > 0 else float("-inf")
        out["value_peak"] = baseline + peak * (alpha - beta * (log_peak if form == "rl" else peak))
        if not d.min() <= peak <= d.max():
            notes.append(f"the peak (d = {peak:.3g}) lies outside the measured d [{d.min():.3g}, {d.max():.3g}]")
    else:
        out["d_peak"] = out["value_peak"] = None
        notes.append("no peak: the fitted score keeps rising (or falling) beyond the measured d")
    if r2 is not None and r2 < POOR_R2:
        notes.append(f"poor fit (R² {r2:.2f})")
    if len(d) <= 2:
        notes.append("two points: an exact fit, R² says nothing")
    if notes:
        out["note"] = "; ".join(notes)
    return out


def value(form: str, f: dict, d) -> np.ndarray:
    """The fitted curve at distances `d` (baseline included), for plotting."""
    d = np.asarray(d, dtype=np.float64)
    shape = np.log(np.maximum(d, 1e-12)) if form == "rl" else d
    return f.get("baseline", 0.0) + d * (f["alpha"] - f["beta"] * shape)


def round_fits(curve: list[dict], best_of_n: dict | None, baseline: dict) -> dict:
    """metrics["fits"]: the RL form to the curve's gold and proxy, the best-of-n form to best_of_n's gold
    and proxy at d = sqrt(kl_bound). `baseline`: {"gold": .., "proxy": ..} of the reference (None: fit raw
    scores); best-of-n's own baseline is its n = 1 point (d = 0)."""
    out = {}
    if curve:
        d = [p["d"] for p in curve]
        for key in ("gold", "proxy"):
            out[f"rl_{key}"] = fit("rl", d, [p[key] for p in curve], baseline.get(key) or 0.0)
    if best_of_n:
        ns = sorted(best_of_n, key=int)
        d = [math.sqrt(best_of_n[n]["kl_bound"]) for n in ns]
        for key in ("gold", "proxy"):
            first = best_of_n[ns[0]][key] if ns[0] == "1" else 0.0
            out[f"bon_{key}"] = fit("bon", d, [best_of_n[n][key] for n in ns], first)
    return out


def describe(name: str, f: dict) -> str:
    """One line of a fit for the round's summary."""
    if f.get("alpha") is None:
        return f"{name}: {f.get('missing', 'not fitted')}"
    peak = "no peak" if f.get("d_peak") is None else f"peak {f['value_peak']:.3f} at d = {f['d_peak']:.3g}"
    r2 = "-" if f["r2"] is None else f"{f['r2']:.2f}"
    note = f" ({f['note']})" if f.get("note") else ""
    return f"{name}: α {f['alpha']:.3f}, β {f['beta']:.3f}, {peak}, R² {r2}{note}"
