"""Over-optimisation as curves (evaluate.checkpoints): checkpoints inside a round, Gao et al.'s fits, the alarm
on the curve, and the landscape's training-prompt cells."""

import math
import shutil

import numpy as np
import pytest

from rlhf.core.paths import round_paths
from rlhf.evaluation import fits, landscape, metrics
from rlhf.ml import checkpoints
from tests.test_update_policy import config

# --- pure pieces ------------------------------------------------------------------------------------


def test_checkpoint_plan_spreads_n_points_evenly_and_over_slices():
    assert checkpoints.fractions(3) == [0.25, 0.5, 0.75]
    assert checkpoints.plan(3, 8) == {2: [1], 4: [2], 6: [3]}
    assert checkpoints.plan(2, 2) == {1: [1, 2]}  # fewer steps than checkpoints: two on one step, both saved
    # ReST-like: two improve steps of 10 steps each; 3 checkpoints at 1/4, 1/2, 3/4 of the whole update
    assert checkpoints.plan(3, 10, 0.0, 0.5) == {5: [1], 10: [2]}
    assert checkpoints.plan(3, 10, 0.5, 1.0) == {5: [3]}


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.5), (0.4, 0.2), (2.0, 1.5)])
def test_rl_fit_recovers_known_alpha_beta_and_the_peak(alpha, beta):
    d = np.linspace(0.2, 6.0, 12)
    y = 0.3 + d * (alpha - beta * np.log(d))  # the reference scores 0.3
    f = fits.fit("rl", d, y, baseline=0.3)
    assert f["alpha"] == pytest.approx(alpha) and f["beta"] == pytest.approx(beta) and f["r2"] == pytest.approx(1)
    peak = math.exp(alpha / beta - 1)
    assert f["d_peak"] == pytest.approx(peak)
    assert f["value_peak"] == pytest.approx(0.3 + peak * (alpha - beta * math.log(peak)))
    assert ("outside" in f.get("note", "")) == (not 0.2 <= peak <= 6.0)
    assert fits.value("rl", f, d) == pytest.approx(y)


def test_best_of_n_fit_recovers_known_alpha_beta_from_kl_bounds():
    alpha, beta = 0.8, 0.3
    ns = [1, 2, 4, 8, 16, 32]
    d = np.sqrt([metrics.best_of_n_kl(n) for n in ns])
    bon = {str(n): {"gold": 0.5 + x * (alpha - beta * x), "proxy": 0.1 + x, "kl_bound": x * x} for n, x in zip(ns, d)}
    got = fits.round_fits([], bon, {})
    g = got["bon_gold"]
    assert g["alpha"] == pytest.approx(alpha) and g["beta"] == pytest.approx(beta)
    assert g["d_peak"] == pytest.approx(alpha / (2 * beta)) and g["baseline"] == pytest.approx(0.5)  # n = 1's gold
    assert got["bon_proxy"]["d_peak"] is None and "no peak" in got["bon_proxy"]["note"]  # proxy rises linearly


def _peak_weighted_by_one_over_d_squared(d, y):
    """The estimator fits.py used before: least squares on R/d (each point weighted by 1/d² in R)."""
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(d), -np.log(d)], 1), y / d, rcond=None)
    return math.exp(a / b - 1) if b > 0 and a / b - 1 < 50 else math.inf


@pytest.mark.parametrize("noise", [0.005, 0.011, 0.03])
@pytest.mark.parametrize(
    ("d", "bound"),
    [([0.05, 1.0, 2.0, 3.0, 4.0], 25), ([0.5, 1.5, 2.5, 3.5], 11)],  # a checkpoint near d = 0; a plain 4-point curve
)
def test_rl_fit_finds_a_noisy_curves_peak_closer_than_fitting_r_over_d_and_its_interval_covers_it(d, bound, noise):
    """Noisy gold curves with a known peak (d* = e, inside the measured d): the median error of the fitted peak
    stays within `bound` x noise, which the 1/d²-weighted fit misses, and the 95% interval holds the true peak
    in about 95% of the curves."""
    alpha, beta, d = 0.3, 0.15, np.array(d)
    truth = math.exp(alpha / beta - 1)
    rng = np.random.default_rng(7)
    new, old, covered = [], [], 0
    for _ in range(200):
        y = 0.4 + d * (alpha - beta * np.log(d)) + rng.normal(0, noise, len(d))
        f = fits.fit("rl", d, y, 0.4, [noise] * len(d))
        new.append(abs((f["d_peak"] or math.inf) - truth))
        old.append(abs(_peak_weighted_by_one_over_d_squared(d, y - 0.4) - truth))
        covered += f["d_peak_low"] <= truth <= (f["d_peak_high"] or math.inf)
    assert np.median(new) < bound * noise < np.median(old), (np.median(new), np.median(old))
    assert 0.9 <= covered / 200 <= 0.99


def test_peak_interval_says_where_the_peak_lies_and_is_open_without_a_clear_peak():
    d = np.array([0.5, 1.0, 1.5, 2.0])
    exact = fits.fit("rl", d, 0.3 + d * (1 - 0.5 * np.log(d)), 0.3, [0.01] * 4)  # peak at e: beyond 2
    assert exact["peak_where"] == "beyond" and exact["d_peak_low"] > 2 and "95%" in fits.describe("rl", exact)
    before = fits.fit("rl", d, d * (0.2 - 0.5 * np.log(d)), 0.0, [0.01] * 4)  # peak at e^-0.6 = 0.55 .. just inside
    assert before["d_peak_low"] < before["d_peak"] < before["d_peak_high"]
    rising = fits.fit("rl", d, 0.1 * d, 0.0, [0.05] * 4)  # a straight line: beta 0 within its error
    assert rising["d_peak_high"] is None and rising["peak_where"] in ("beyond", "uncertain")
    assert fits.fit("rl", [1.0, 2.0], [0.5, 0.6])["peak_where"] == "uncertain"  # two exact points, no errors


def test_fit_of_noise_says_it_is_poor_and_too_few_points_are_missing():
    rng = np.random.default_rng(0)
    d = np.linspace(0.5, 3, 10)
    assert "poor fit" in fits.fit("rl", d, rng.normal(size=10))["note"]
    assert fits.fit("rl", [0.0, 1.0], [0.0, 1.0])["alpha"] is None  # one point with d > 0
    assert "R²" in fits.describe("rl_gold", fits.fit("rl", d, d * (1 - 0.5 * np.log(d))))


def test_curve_alarm_names_the_checkpoint_where_proxy_rises_while_gold_falls():
    def pt(step, gold, proxy):
        return {"step": step, "fraction": step / 4, "gold": gold, "proxy": proxy, "d": 0.1 * step}

    curve = [pt(1, 0.5, 0.1), pt(2, 0.6, 0.2), pt(3, 0.55, 0.4), pt(4, 0.5, 0.6)]
    (alarm,) = metrics.curve_alarms(curve)
    assert "from checkpoint 2" in alarm and "0.600 -> 0.550" in alarm
    assert metrics.curve_alarms(curve[:2]) == []  # both rising: no alarm
    assert metrics.alarms({"mean": 0.1, "sem": 0.01}, {"gold": 1, "proxy": 1}, None) == []  # the old ones stand


def test_landscape_marks_cells_that_are_training_prompts():
    from rlhf.core.config import Landscape

    spec = Landscape(
        axes={"opener": ["tell me about", "describe"], "topic": ["ocean", "moon"]},
        template="{opener} the {topic} please .",
        samples=1,
    )
    cells = landscape.prompts(spec)
    seen = landscape.seen(cells, {"describe the moon please .", "something else"})
    land = landscape.grid(spec, np.array([0.1, 0.2, 0.3, 0.9]), np.array([0.0, 1.0, 0.0, 1.0]), ["r"] * 4, seen)
    assert land["seen"] == [[False, False], [False, True]]
    marked = {(c["opener"], c["topic"]): c["seen"] for c in landscape.disagreements(land, n=4)}
    assert marked[("describe", "moon")] and not marked[("describe", "ocean")]
    means = landscape.seen_means(land)
    assert means["seen"] == {"cells": 1, "gold": pytest.approx(0.9), "proxy": pytest.approx(1.0)}
    assert means["unseen"]["cells"] == 3 and means["unseen"]["gold"] == pytest.approx(0.2)


# --- a round with checkpoints, through the step functions -------------------------------------------


@pytest.fixture(scope="module")
def curve_project(tiny_project, tmp_path_factory):
    dest = tmp_path_factory.mktemp("curves") / "project"
    shutil.copytree(tiny_project, dest)
    return dest


@pytest.mark.parametrize("method", ["dpo", "ppo"])
def test_round_with_two_checkpoints_has_a_three_point_curve(curve_project, monkeypatch, method):
    from tasks.evaluate import evaluate
    from tasks.update_policy import update_policy

    monkeypatch.chdir(curve_project)
    cfg = config(
        {
            "evaluate": {"checkpoints": 2, "best_of_n": [1, 2]},
            "update_policy": {"method": method, "ppo": {"rollout_prompts": 8, "epochs": 0.5, "ppo_epochs": 1}},
        }
    )
    update_policy(cfg, "r01")
    folder = round_paths("r01").checkpoints
    saved = checkpoints.saved(folder)
    assert [m["index"] for _, m in saved] == [1, 2] and all((p / "model.safetensors").is_file() for p, _ in saved)
    m = evaluate(cfg, "r01")
    curve = m["curve"]
    assert len(curve) == 3 and [p["step"] for p in curve] == [1, 2, 3]
    assert 0 < curve[0]["fraction"] < curve[1]["fraction"] < curve[2]["fraction"] == 1
    last = curve[-1]
    assert last["gold"] == m["gold"]["mean"] and last["proxy"] == m["proxy"]["mean"]
    assert last["kl"] == m["kl"]["per_sequence"] > 0 and last["d"] == m["kl"]["d"]
    assert all(p["kl"] >= 0 and p["d"] == pytest.approx(math.sqrt(p["kl"])) for p in curve)
    assert all(0 <= p["win_vs_sft"] <= 1 for p in curve)
    assert {"rl_gold", "rl_proxy", "bon_gold", "bon_proxy"} <= set(m["fits"])
    assert m["fits"]["baseline"]["round"] == "r00"
    assert not folder.exists()  # scratch: deleted once scored
    again = evaluate(cfg, "r01")  # evaluate alone again: the checkpoints are gone, and it says so
    assert again["curve"]["mean"] is None and "update_policy" in again["curve"]["missing"]


def test_a_checkpoints_weights_go_once_scored_and_a_crashed_evaluate_resumes_to_the_same_curve(
    curve_project, monkeypatch
):
    """Scratch as large as the policy lives no longer than its scoring: a judge that fails on the second checkpoint
    leaves the first one's point and no weights; evaluate again scores the rest, to the curve a clean run gives."""
    from rlhf.core.errors import UserError
    from rlhf.evaluation import curves
    from tasks.evaluate import evaluate
    from tasks.update_policy import update_policy

    monkeypatch.chdir(curve_project)
    cfg = config({"evaluate": {"checkpoints": 2}})
    update_policy(cfg, "r01")
    folder = round_paths("r01").checkpoints
    kept = folder.parent / "kept-checkpoints"
    shutil.copytree(folder, kept)
    clean = evaluate(cfg, "r01")["curve"]
    shutil.copytree(kept, folder)
    scored = []
    real = curves.checked

    def failing(scores, where):  # the judge's check, failing at the second checkpoint
        if "checkpoint 2" in where:
            raise UserError("the judge went away")
        scored.append(where)
        return real(scores, where)

    monkeypatch.setattr(curves, "checked", failing)
    with pytest.raises(UserError, match="went away"):
        evaluate(cfg, "r01")
    first, second = (p for p, _ in checkpoints.saved(folder))
    assert sorted(f.name for f in first.iterdir()) == ["checkpoint.json", curves.POINT]  # no weights left
    assert (second / "model.safetensors").is_file()
    monkeypatch.setattr(curves, "checked", real)
    assert evaluate(cfg, "r01")["curve"] == clean
    shutil.rmtree(kept)


def test_report_draws_the_curves_with_their_fits_and_marks_training_prompt_cells(tmp_path):
    import json

    from rlhf.core.config import Landscape
    from rlhf.evaluation.report import round_markdown, write_report

    def round_metrics(rnd, alpha):
        d = np.array([0.3, 0.6, 1.0])
        curve = [
            {"step": i + 1, "fraction": (i + 1) / 3, "gold": 0.4 + x * (alpha - 0.5 * math.log(x)), "proxy": 0.2 + x}
            | {"kl": x * x, "d": x}
            for i, x in enumerate(d)
        ]
        m = {"round": rnd, "gold": {"mean": curve[-1]["gold"], "sem": 0.01, "count": 8, "best": 1.0}, "length": 5}
        m |= {"kl": {"per_sequence": 1.0, "per_token": 0.1, "d": 1.0}, "proxy": {"mean": 1.2}, "curve": curve}
        m["fits"] = fits.round_fits(curve, None, {"gold": 0.4, "proxy": 0.2})
        return m

    spec = Landscape(
        axes={"opener": ["describe", "explain"], "topic": ["moon", "sun"]}, template="{opener} the {topic} .", samples=1
    )
    seen = landscape.seen(landscape.prompts(spec), {"explain the sun ."})
    land = landscape.grid(spec, np.array([0.1, 0.5, 0.3, 0.9]), np.array([1.0, 0.0, 0.5, 1.0]), ["a"] * 4, seen)
    for rnd, alpha in (("r01", 0.3), ("r02", 0.6)):
        folder = round_paths(rnd, tmp_path).root
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(round_metrics(rnd, alpha)))
        (folder / "landscape.json").write_text(json.dumps(land))
    page = write_report(["r01", "r02"], tmp_path / "reports", tmp_path).read_text()
    assert "Gold and proxy against d inside each round" in page
    assert "<b>r02</b>: RL, gold: α 0.600, β 0.500" in page  # the fits, per round
    assert "sun (training prompt)" in page and "training prompts: 1 cells, mean gold 0.900" in page
    assert "unseen prompts: 3 cells" in page
    assert "- fit RL, proxy: " in round_markdown(round_metrics("r01", 0.3), [])


@pytest.mark.parametrize("method", ["rest", "rloo"])
def test_trl_methods_save_evenly_spread_checkpoints_lora_as_adapters(curve_project, monkeypatch, method):
    from tasks.update_policy import update_policy

    monkeypatch.chdir(curve_project)
    lora = {"rank": 4, "target_modules": ["q_proj", "v_proj"]} if method == "rest" else {}
    cfg = config(
        {
            "evaluate": {"checkpoints": 3},
            "update_policy": {"method": method, "lora": lora, "rest": {"thresholds": [0.0, 0.5]}},
        }
    )
    update_policy(cfg, "r01")
    saved = checkpoints.saved(round_paths("r01").checkpoints)
    assert [m["index"] for _, m in saved] == [1, 2, 3]
    assert all(0 < m["fraction"] < 1 for _, m in saved) and saved[0][1]["fraction"] < saved[2][1]["fraction"]
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert all((p / weights).is_file() for p, _ in saved)
    if method == "rest":  # 1/4 and 1/2 in the first improve step, 3/4 in the second
        assert saved[1][1]["fraction"] <= 0.5 < saved[2][1]["fraction"]
