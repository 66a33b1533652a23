"""Evaluation statistics on hand-made numbers."""

import math

import numpy as np
import pytest
import torch

from rlhf.evaluation import metrics
from rlhf.ml import logits


def test_win_rate_counts_ties_as_half():
    mine = np.array([[0.5, 1.0], [0.2, 0.2]])
    theirs = np.array([[0.5], [0.1]])
    # prompt 1: tie (0.5) and win (1.0); prompt 2: two wins
    assert metrics.win_rate(mine, theirs) == {"mean": (0.5 + 1 + 1 + 1) / 4, "pairs": 4}
    assert metrics.win_rate(theirs, theirs)["mean"] == 0.5
    assert metrics.win_rate(mine, np.empty((0, 0)))["mean"] is None


def test_pairwise_accuracy_skips_gold_ties_and_reports_missing_with_a_reason():
    gold = np.array([[1.0, 0.0, 0.0], [0.3, 0.3, 0.3]])
    proxy = np.array([[2.0, 1.0, 3.0], [0.0, 1.0, 2.0]])
    # prompt 1 pairs with different gold: (0,1) right, (0,2) wrong; (1,2) is a gold tie; prompt 2 all ties
    assert metrics.pairwise_accuracy(proxy, gold) == {"mean": 0.5, "pairs": 2}
    none = metrics.pairwise_accuracy(proxy[1:], gold[1:])
    assert none["mean"] is None and "no two samples" in none["missing"] and none["pairs"] == 0


def test_standardised_mmd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    assert metrics.standardised_mmd(x, 3 * x + 7) == pytest.approx(0, abs=1e-12)  # same shape, other scale
    bimodal = np.concatenate([rng.normal(-3, 0.3, 200), rng.normal(3, 0.3, 200)])
    same = metrics.standardised_mmd(x, rng.normal(size=400))  # sampling noise only
    assert metrics.standardised_mmd(x, bimodal) > 5 * same
    # hand computation for two points each: after standardising both are [-1, 1], so MMD is 0
    assert metrics.standardised_mmd(np.array([0.0, 2.0]), np.array([5.0, 6.0])) == pytest.approx(0)
    assert metrics.standardised_mmd(np.array([1.0, 1.0]), x)["mean"] is None  # no spread: missing, not 0


def test_best_of_n_analytic_kl_and_selection():
    assert metrics.best_of_n_kl(1) == 0
    assert metrics.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    proxy = np.array([[0.1, 0.9, 0.5, 2.0], [1.0, 0.0, 3.0, 0.5]])
    gold = np.array([[0.0, 1.0, 0.2, 0.3], [0.7, 0.6, 0.1, 0.9]])
    got = metrics.best_of_n(proxy, gold, [1, 2, 4])
    assert got["1"]["gold"] == pytest.approx(0.35) and got["1"]["kl_bound"] == 0
    assert got["2"] == {
        "gold": pytest.approx(0.85),
        "proxy": pytest.approx(0.95),
        "kl_bound": metrics.best_of_n_kl(2),
    } | {
        "gold_sem": pytest.approx(0.15),  # picks 1.0 and 0.7: sd 0.212 over 2 prompts
        "proxy_sem": pytest.approx(0.05),
    }
    assert got["4"]["gold"] == pytest.approx((0.3 + 0.1) / 2)  # the proxy's best can be gold's worse


def test_categorical_kl_on_known_distributions_in_both_directions():
    """KL(p || q), not KL(q || p): the two differ here (0.511 against 0.368). (More in test_reference_math.py.)"""
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert float(logits.categorical_kl(p.log(), q.log())) == pytest.approx(expected)
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert float(logits.categorical_kl(q.log(), p.log())) == pytest.approx(reverse)


def test_alarms():
    quiet = {"mean": 0.5, "sem": 0.1}
    assert metrics.alarms(quiet, {"gold": 0.8, "proxy": 1.0}, {"gold": 0.7, "proxy": 0.5}) == []
    assert metrics.alarms(quiet, {"gold": 0.8, "proxy": 1.0}, None) == []
    negative = metrics.alarms({"mean": -0.5, "sem": 0.1}, {"gold": 0.8, "proxy": 1.0}, None)
    assert len(negative) == 1 and negative[0].startswith("negative KL estimate")
    assert metrics.alarms({"mean": -0.1, "sem": 0.1}, {"gold": 0.8, "proxy": 1.0}, None) == []  # within noise
    over = metrics.alarms(quiet, {"gold": 0.6, "proxy": 1.5}, {"gold": 0.7, "proxy": 1.0})
    assert len(over) == 1 and "gold fell (0.700 -> 0.600) while the proxy rose" in over[0]


def test_summary_of_nothing_is_missing_not_zero():
    assert metrics.summary([]) == {"mean": None, "missing": "no samples", "count": 0}


def test_summary_std_and_sem_against_hand_computed_values():
    """The error bars of every metric: the sample std (n - 1) and the standard error of the mean, worked by
    hand: mean 5, squared deviations 9+1+1+1+0+0+4+16 = 32, variance 32/7, sem sqrt(32/7/8) = sqrt(4/7)."""
    got = metrics.summary([2, 4, 4, 4, 5, 5, 7, 9])
    assert got == {
        "mean": 5.0,
        "std": pytest.approx(2.13809, abs=1e-5),
        "sem": pytest.approx(0.75593, abs=1e-5),
        "count": 8,
    }


def test_an_alarm_when_most_responses_hit_the_token_limit():
    [alarm] = metrics.unfinished("generate", 0.3, 24)
    assert alarm.startswith("70% of generate's responses hit generate.max_new_tokens (24) without ending")
    assert metrics.unfinished("evaluate", 0.5, 24) == []


def test_a_round_that_loses_gold_beyond_3_se_is_an_alarm_whatever_the_proxy_did():
    now = {"mean": 0.630, "sem": 0.010}
    earlier = {"r02": {"mean": 0.850, "sem": 0.010}, "r00": {"mean": 0.643, "sem": 0.011}}
    (alarm,) = metrics.regressions(now, earlier)  # r02: 15.6 SE; r00: 0.9 SE, within the noise
    assert alarm.startswith("regression: gold fell below r02's (0.850 -> 0.630, 15.6 standard errors)")
    assert metrics.regressions({"mean": 0.59, "sem": 0.01}, {"r00": {"mean": 0.643, "sem": 0.011}})  # below SFT
    assert metrics.regressions({"mean": 0.86, "sem": 0.01}, earlier) == []


def test_a_rollout_kl_jumping_over_4x_in_one_iteration_is_an_alarm_naming_the_iteration():
    (alarm,) = metrics.kl_spikes("update_policy@r03", [5.777, 161.632, 150.0])
    assert alarm.startswith("KL spike in update_policy@r03, iteration 2: 5.8 -> 161.6")
    assert metrics.kl_spikes("s", [0.0, 3.9, 7.0, 20.0]) == []  # from ~0: up to 4 nats is no spike; 2.9x is none
    assert len(metrics.kl_spikes("s", [0.0, 7.1])) == 1


def test_kl_is_reported_as_an_estimate_over_responses_with_its_standard_error_and_ds():
    kl = metrics.kl_estimate([1.0, 3.0, 2.0, 6.0], [2, 4, 2, 8])
    assert kl["per_sequence"] == 3.0 and kl["per_token"] == 12 / 16 and kl["samples"] == 4
    assert kl["per_sequence_sem"] == pytest.approx(np.std([1, 3, 2, 6], ddof=1) / 2)
    assert kl["d"] == pytest.approx(math.sqrt(3)) and kl["d_sem"] == pytest.approx(
        kl["per_sequence_sem"] / (2 * kl["d"])
    )
    assert metrics.kl_estimate([0.0, 0.0], [1, 1])["d_sem"] is None  # d = 0: no delta-method error
