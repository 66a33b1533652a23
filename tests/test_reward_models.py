"""Proxy reward models: the data each round trains on, the objectives, the RM init, and the reward the
policy optimises (one RM, ensembles, the weight average)."""

import shutil

import numpy as np
import pytest
import torch

from rlhf.core.config import Config
from rlhf.core.io import write_jsonl
from rlhf.core.paths import round_paths
from rlhf.ml import models, sampling
from rlhf.ml.reward import ProxyReward, average_weights, combine
from tasks.train_rm import rm_pairs
from tests.conftest import deep_update

THREE = {"r01": "r00", "r02": "r01", "r03": "r02"}


def write_labels(n_prompts: int = 40):
    """Hand-made labels for rounds 1-3: prompt i of round r has pairs (r, i, j) for j < 2."""
    for r in ("r01", "r02", "r03"):
        rows = [
            {
                "prompt_id": f"p{i}",
                "prompt": f"prompt {i}",
                "responses": [],
                "gold": [],
                "pairs": [
                    {
                        "chosen": f"{r}-{i}-{j}",
                        "rejected": "x",
                        "chosen_gold": 1.0,
                        "rejected_gold": 0.0,
                        "margin": 1.0,
                        "flipped": False,
                    }
                    for j in range(2)
                ],
            }
            for i in range(n_prompts)
        ]
        write_jsonl(round_paths(r).labels, rows)


def cfg_with(**train_rm) -> Config:
    return Config.model_validate({"rounds": THREE, "train_rm": train_rm})


def test_last_concat_and_sample_use_exactly_their_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_labels()  # 80 pairs per round
    count = lambda pairs: {r: sum(p["round"] == r for p in pairs) for r in ("r01", "r02", "r03")}  # noqa: E731
    assert count(rm_pairs(cfg_with(data="last"), "r03", 0)) == {"r01": 0, "r02": 0, "r03": 80}
    assert count(rm_pairs(cfg_with(data="concat"), "r02", 0)) == {"r01": 80, "r02": 80, "r03": 0}
    assert count(rm_pairs(cfg_with(data="concat"), "r03", 0)) == {"r01": 80, "r02": 80, "r03": 80}
    assert count(rm_pairs(cfg_with(data="sample", sample_size=91), "r03", 0)) == {"r01": 31, "r02": 30, "r03": 30}
    assert count(rm_pairs(cfg_with(data="sample", sample_size=60), "r02", 0)) == {"r01": 30, "r02": 30, "r03": 0}
    unique = rm_pairs(cfg_with(data="sample", sample_size=39, unique_prompts=True), "r03", 0)
    prompts = [p["prompt"] for p in unique]
    assert len(prompts) == len(set(prompts)) == 39  # each prompt at most once, across rounds too
    again = rm_pairs(cfg_with(data="sample", sample_size=91), "r03", 0)
    assert again == rm_pairs(cfg_with(data="sample", sample_size=91), "r03", 0)  # seeded

    from rlhf.core.errors import UserError

    with pytest.raises(UserError, match="train_rm.sample_size: round r01 has 80 usable pairs, its share is 90"):
        rm_pairs(cfg_with(data="sample", sample_size=90), "r01", 0)


def test_ensembles_match_hand_computation():
    scores = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [2.0, 1.0, 3.0]])
    assert combine(scores, "ensemble_mean").tolist() == [2.0, 1.0, 1.0]
    assert combine(scores, "ensemble_min").tolist() == [1.0, 0.0, 0.0]
    std = np.sqrt(np.array([2 / 3, 2 / 3, 2.0]))
    assert combine(scores, "ensemble_uwo", 0.5) == pytest.approx(np.array([2.0, 1.0, 1.0]) - 0.5 * std)


@pytest.fixture
def rm_project(tiny_project, tmp_path, monkeypatch):
    """The tiny project with round 1's RM copied into rounds 2 and 3 and perturbed, so they differ."""
    project = tmp_path / "project"
    shutil.copytree(tiny_project, project)
    monkeypatch.chdir(project)
    for i, r in enumerate(("r02", "r03"), 1):
        rm = models.load_reward_model(round_paths("r01").reward_model)
        with torch.no_grad():
            rm.score.weight.mul_(1 + i)
        models.save(rm, models.load_tokenizer(round_paths("r01").reward_model), round_paths(r).reward_model)
    return project


def test_proxy_reward_ensembles_and_weight_average(rm_project):
    tok = models.load_tokenizer(round_paths("r01").reward_model)
    prompts, responses = ["user : describe the ocean . assistant :"] * 2, [" the water is blue .", " an elephant ."]
    each = np.stack(
        [
            sampling.reward_scores(models.load_reward_model(round_paths(r).reward_model), tok, prompts, responses)
            for r in ("r01", "r02", "r03")
        ]
    )
    base = {"rounds": THREE}

    def reward(kind, **kw):
        return ProxyReward(
            Config.model_validate(deep_update(base, {"update_policy": {"reward": kind, **kw}})), "r03", tok
        )

    assert reward("last")(prompts, responses) == pytest.approx(each[2])
    assert reward("ensemble_mean")(prompts, responses) == pytest.approx(each.mean(0))
    assert reward("ensemble_min")(prompts, responses) == pytest.approx(each.min(0))
    assert reward("ensemble_uwo", uwo_lambda=2.0)(prompts, responses) == pytest.approx(each.mean(0) - 2 * each.std(0))
    rms = [models.load_reward_model(round_paths(r).reward_model) for r in ("r01", "r02", "r03")]
    expected = {
        k: torch.stack([dict(m.named_parameters())[k] for m in rms]).mean(0) for k, _ in rms[0].named_parameters()
    }
    avg = reward("weight_average").rms[0]
    assert all(torch.allclose(p, expected[k]) for k, p in avg.named_parameters())
    assert torch.allclose(avg.score.weight, rms[0].score.weight * 2)  # (1 + 2 + 3) / 3
    assert average_weights([rms[0]]) is rms[0]


@pytest.mark.parametrize("objective", ["bt_margin", "absolute", "combined"])
def test_objectives_train_an_rm_that_ranks_gold_pairs(rm_project, objective):
    from tasks.train_rm import train_rm

    cfg = Config.model_validate(
        deep_update(
            __import__("yaml").safe_load(open("params.yaml")), {"train_rm": {"objective": objective, "weight": 0.3}}
        )
    )
    summary = train_rm(cfg, "r01")
    rm = models.load_reward_model(round_paths("r01").reward_model)
    assert rm.config.num_labels == (2 if objective == "combined" else 1)
    assert summary["train_accuracy"] > 0.7, summary
    if objective == "combined":  # the reward is w sigmoid(preference) + (1 - w) sigmoid(absolute)
        assert rm.config.combined_weight == 0.3
        logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
        expected = 0.3 * torch.sigmoid(logits[:, 0]) + 0.7 * torch.sigmoid(logits[:, 1])
        assert torch.allclose(sampling.reward_of(rm, logits), expected)


def test_rm_init_last_starts_from_the_previous_rounds_rm(rm_project):
    from tasks.train_rm import _initial_rm

    cfg = Config.model_validate({"rounds": THREE, "train_rm": {"init": "last"}})
    _, rm = _initial_rm(cfg, "r03")
    prev = models.load_reward_model(round_paths("r02").reward_model)
    assert all(torch.equal(a, b) for a, b in zip(rm.parameters(), prev.parameters()))
    _, first = _initial_rm(cfg, "r01")  # round 1 has no previous RM: the SFT policy with a new head
    assert first.config.num_labels == 1 and not torch.equal(first.score.weight, prev.score.weight)


def test_evaluate_reports_what_it_cannot_compute_as_missing_with_the_reason(rm_project):
    import json

    import yaml

    from tasks.evaluate import evaluate

    cfg = Config.model_validate(
        deep_update(
            yaml.safe_load(open("params.yaml")),
            {"evaluate": {"samples_per_prompt": 1, "best_of_n": [1], "landscape": {"samples": 1}}},
        )
    )
    m = evaluate(cfg, "r01")
    assert m["proxy_accuracy"]["mean"] is None and "no two samples" in m["proxy_accuracy"]["missing"]
    assert m["gold"]["count"] == 24 and np.isfinite(m["gold"]["mean"])  # the round still finished
    assert set(m["best_of_n"]) == {"1"} and m["best_of_n"]["1"]["kl_bound"] == 0  # one sample each: no choice to make
    assert json.loads(round_paths("r01").metrics.read_text())["proxy_accuracy"] == m["proxy_accuracy"]
    assert 0 <= m["win_rate"]["vs_sft"]["mean"] <= 1
