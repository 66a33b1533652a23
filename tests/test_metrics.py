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
    assert got["2"] == {"gold": pytest.approx(0.85), "proxy": pytest.approx(0.95), "kl_bound": metrics.best_of_n_kl(2)}
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
