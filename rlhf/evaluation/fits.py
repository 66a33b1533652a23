"""Gao et al. (2022)'s scaling forms fitted to a round's over-optimisation curve, pure numpy.

Gold (or proxy) gain over the reference, as a function of d = sqrt(KL(policy || reference)):
- RL:        R(d) = d (alpha - beta log d), peak at d* = exp(alpha/beta - 1) when beta > 0;
- best-of-n: R(d) = d (alpha - beta d),     peak at d* = alpha / (2 beta) when beta > 0.
Both are linear in (alpha, beta), so ordinary least squares on R itself fits them in closed form. (Dividing by
d first, to fit R/d, weights each point by 1/d²: a point near d = 0 then decides the fit, and the peak's error
is several times larger on noisy curves; tests/test_curves.py measures it.) The gain is the score less a
`baseline` (the reference's own score, where R(0) = 0); without one, the scores are fitted as they are.

The peak's uncertainty: (alpha, beta) drawn from the fit's normal approximation, their covariance from the
noise of the points (the residuals', or the points' own standard errors where larger), the peak recomputed
for each draw; a 95% interval of d* and of the peak value, and where d* lies against the measured d
(`peak_where`: inside, before, beyond, or uncertain when the interval straddles an edge). The error of d
itself (an estimate too) is left out, so the intervals are somewhat too narrow.
"""

from __future__ import annotations

import math

import numpy as np

POOR_R2 = 0.5  # below: the form does not describe the curve, say so beside the numbers
DRAWS = 4000  # parametric bootstrap draws for the peak's interval (seeded: the same curve, the same interval)
MAX_EXPONENT = 50.0  # exp of a larger alpha/beta - 1 is a peak so far out it is no peak (nor JSON)


def fit(form: str, d, y, baseline: float = 0.0, sem=None) -> dict:
    """Fit `form` ("rl" or "bon") to scores `y` at distances `d` (points with d <= 0 are left out); `sem`: each
    score's standard error, if known. Returns alpha, beta, their standard errors, d_peak and value_peak
    (baseline added back) with 95% intervals (*_low, *_high; None where unbounded), peak_where, r2, points, and
    `note` when the fit is poor, has no peak, or peaks outside the measured d; or {"missing": reason}."""
    d, y = np.asarray(d, dtype=np.float64), np.asarray(y, dtype=np.float64) - baseline
    se = np.zeros_like(d) if sem is None else np.nan_to_num(np.asarray(sem, dtype=np.float64))
    keep = (d > 0) & np.isfinite(d) & np.isfinite(y)
    d, y, se = d[keep], y[keep], se[keep]
    if len(d) < 2 or np.ptp(d) == 0:
        return {"alpha": None, "beta": None, "missing": f"{len(d)} distinct points with d > 0: too few to fit"}
    x = np.stack([d, -d * _shape(form, d)], 1)
    (alpha, beta), *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ (alpha, beta)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((residual**2).sum()) / total if total > 0 else None
    out = {"form": form, "alpha": float(alpha), "beta": float(beta), "r2": r2, "points": int(len(d))}
    out["baseline"] = float(baseline)
    cov = _covariance(x, residual, se)
    out |= _peak_with_interval(form, alpha, beta, cov, baseline, (d.min(), d.max()))
    notes = []
    if out["d_peak"] is None:
        notes.append("no peak: the fitted score keeps rising (or falling) beyond the measured d")
    elif not d.min() <= out["d_peak"] <= d.max():
        notes.append(f"the peak (d = {out['d_peak']:.3g}) lies outside the measured d [{d.min():.3g}, {d.max():.3g}]")
    if r2 is not None and r2 < POOR_R2:
        notes.append(f"poor fit (R² {r2:.2f})")
    if len(d) <= 2:
        notes.append("two points: an exact fit, R² says nothing")
    if notes:
        out["note"] = "; ".join(notes)
    return out


def _shape(form: str, d):
    return np.log(np.maximum(d, 1e-12)) if form == "rl" else d


def _covariance(x, residual, se) -> np.ndarray | None:
    """(alpha, beta)'s covariance: the noise variance (the residuals' with n - 2 degrees of freedom, or the
    points' own squared standard errors where those are larger) times (X'X)^-1; None with neither."""
    n = len(residual)
    noise = max(float((residual**2).sum()) / (n - 2) if n > 2 else 0.0, float((se**2).mean()))
    if noise == 0:
        return None
    return noise * np.linalg.pinv(x.T @ x)


def peaks(form: str, alpha, beta) -> tuple[np.ndarray, np.ndarray]:
    """(d*, gain at d*) for arrays of (alpha, beta); d* is inf where there is no peak (beta <= 0, or so far out
    that it is none), and the gain then nan."""
    alpha, beta = np.atleast_1d(np.asarray(alpha, dtype=np.float64)), np.atleast_1d(np.asarray(beta, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if form == "rl":
            exponent = alpha / beta - 1
            ok = (beta > 0) & (exponent < MAX_EXPONENT)
            d = np.exp(np.where(ok, exponent, 0.0))
            value = beta * d  # d (alpha - beta log d) at log d = alpha/beta - 1
        else:
            ok = beta > 0
            d = alpha / (2 * beta)
            value = alpha * alpha / (4 * beta)
    return np.where(ok, d, np.inf), np.where(ok, value, np.nan)


def _peak_with_interval(form: str, alpha, beta, cov, baseline: float, measured) -> dict:
    d, value = (float(v[0]) for v in peaks(form, alpha, beta))
    out = {
        "d_peak": d if math.isfinite(d) else None,
        "value_peak": baseline + value if math.isfinite(d) else None,
        "alpha_se": None if cov is None else float(math.sqrt(cov[0, 0])),
        "beta_se": None if cov is None else float(math.sqrt(cov[1, 1])),
        "d_peak_low": None,
        "d_peak_high": None,
        "value_peak_low": None,
        "value_peak_high": None,
        "peak_where": "uncertain" if cov is None else None,
    }
    if cov is None:  # an exact fit of two points without standard errors: nothing tells the error
        return out
    draws = np.random.default_rng(0).multivariate_normal([alpha, beta], cov, DRAWS, method="eigh")
    ds, values = peaks(form, draws[:, 0], draws[:, 1])
    low, high = np.quantile(ds, [0.025, 0.975], method="inverted_cdf")
    out["d_peak_low"], out["d_peak_high"] = _bound(max(low, 0.0)), _bound(high)
    if np.isfinite(ds).mean() >= 0.975:  # a peak in (nearly) every draw: its value has an interval too
        lo, hi = np.quantile(values[np.isfinite(ds)], [0.025, 0.975], method="inverted_cdf")
        out["value_peak_low"], out["value_peak_high"] = baseline + float(lo), baseline + float(hi)
    first, last = measured
    inside = first <= low and high <= last
    out["peak_where"] = "before" if high < first else "beyond" if low > last else "inside" if inside else "uncertain"
    return out


def _bound(v) -> float | None:
    return float(v) if math.isfinite(v) else None  # inf: no bound (nor valid JSON)


def value(form: str, f: dict, d) -> np.ndarray:
    """The fitted curve at distances `d` (baseline included), for plotting."""
    d = np.asarray(d, dtype=np.float64)
    return f.get("baseline", 0.0) + d * (f["alpha"] - f["beta"] * _shape(form, d))


def round_fits(curve: list[dict], best_of_n: dict | None, baseline: dict) -> dict:
    """metrics["fits"]: the RL form to the curve's gold and proxy, the best-of-n form to best_of_n's gold
    and proxy at d = sqrt(kl_bound). `baseline`: {"gold": .., "proxy": ..} of the reference (None: fit raw
    scores); best-of-n's own baseline is its n = 1 point (d = 0). A point's `<key>_sem`, where it has one, is
    its standard error."""
    out = {}
    if curve:
        d = [p["d"] for p in curve]
        for key in ("gold", "proxy"):
            y, sem = [p[key] for p in curve], _sems(curve, key)
            out[f"rl_{key}"] = fit("rl", d, y, baseline.get(key) or 0.0, sem)
    if best_of_n:
        points = [best_of_n[n] for n in sorted(best_of_n, key=int)]
        d = [math.sqrt(p["kl_bound"]) for p in points]
        for key in ("gold", "proxy"):
            first = points[0][key] if min(best_of_n, key=int) == "1" else 0.0
            out[f"bon_{key}"] = fit("bon", d, [p[key] for p in points], first, _sems(points, key))
    return out


def _sems(points: list[dict], key: str) -> list[float] | None:
    sems = [p.get(f"{key}_sem") for p in points]
    return None if None in sems else sems


def describe(name: str, f: dict) -> str:
    """One line of a fit for the round's summary."""
    if f.get("alpha") is None:
        return f"{name}: {f.get('missing', 'not fitted')}"
    peak = "no peak" if f.get("d_peak") is None else f"peak {f['value_peak']:.3f} at d = {f['d_peak']:.3g}"
    if f.get("d_peak_low") is not None:
        high = "∞" if f.get("d_peak_high") is None else f"{f['d_peak_high']:.3g}"
        peak += f" (95%: d in [{f['d_peak_low']:.3g}, {high}], {f['peak_where']})"
    r2 = "-" if f["r2"] is None else f"{f['r2']:.2f}"
    note = f" ({f['note']})" if f.get("note") else ""
    return f"{name}: α {f['alpha']:.3f}, β {f['beta']:.3f}, {peak}, R² {r2}{note}"
