"""The policy update: PPO's invariants, each method on a tiny model, initialisation, LoRA, co-training."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from rlhf.core.config import PPO, Config, CoTrain
from rlhf.core.paths import SFT, round_paths
from rlhf.ml import models, sampling
from rlhf.ml.cotrain import Aux
from rlhf.ml.methods import ppo
from tests.conftest import deep_update, rendered


@pytest.fixture(scope="module")
def scratch_project(tiny_project, tmp_path_factory):
    """A copy of the tiny project (SFT, r01's RM) whose r01 policy the tests here may overwrite."""
    dest = tmp_path_factory.mktemp("update") / "project"
    shutil.copytree(tiny_project, dest)
    return dest


def config(change: dict | None = None) -> Config:
    """The tiny project's params with `change` applied; run from inside the project."""
    import yaml

    return Config.model_validate(deep_update(yaml.safe_load(open("params.yaml")), change or {}))


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --- PPO pieces on hand-made tensors ---------------------------------------------------------------


def test_gae_with_lambda_one_sums_future_rewards_and_with_lambda_zero_is_one_step():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 0.5, 9.0, 9.0]]) * mask
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.5, 2.0, 0.0, 0.0]]))  # Monte Carlo returns
    adv0, _ = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    expected = rewards[0, 0] + 0.9 * values[0, 1] - values[0, 0]
    assert adv0[0, 0] == pytest.approx(float(expected))
    assert adv0[0, 2] == pytest.approx(1.0 - 0.3)  # the last token has no next value
    assert (adv[mask == 0] == 0).all()


def test_whitened_advantages_have_zero_mean_unit_variance_over_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w = ppo.whiten(x, mask)
    assert float(w[mask == 1].mean()) == pytest.approx(0, abs=1e-6)
    assert float(w[mask == 1].var(unbiased=False)) == pytest.approx(1, abs=1e-4)
    assert (w[mask == 0] == 0).all()


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    fixed, adaptive = PPO(kl_coef=0.1), PPO(kl_coef=0.1, target_kl=2.0, horizon=100)
    assert ppo.adapt_beta(0.1, 10.0, fixed, 64) == 0.1
    assert ppo.adapt_beta(0.1, 10.0, adaptive, 64) > 0.1  # KL too high: penalise more
    assert ppo.adapt_beta(0.1, 0.5, adaptive, 64) < 0.1
    assert ppo.adapt_beta(0.1, 2.0, adaptive, 64) == pytest.approx(0.1)


def test_dual_clip_caps_the_loss_of_a_negative_advantage_whose_ratio_ran_away():
    adv = torch.tensor([-1.0, -1.0, 2.0, -1.0])
    ratio = torch.tensor([500.0, 1.1, 500.0, 0.5], requires_grad=True)
    loss, capped = ppo.policy_loss(adv, ratio, PPO(clip=0.2, dual_clip=3.0))
    assert loss.tolist() == pytest.approx([3.0, 1.1, -2.4, 0.8])  # A > 0 clips at 1.2; r = 0.5, A < 0: 0.8 (clip)
    assert capped.tolist() == [True, False, False, False]
    loss.sum().backward()
    assert ratio.grad[0] == 0  # the runaway token no longer pushes the step
    unbounded, _ = ppo.policy_loss(adv, ratio.detach(), PPO(clip=0.2, dual_clip=None))
    assert unbounded[0] == 500.0


# --- PPO on the tiny model ------------------------------------------------------------------------


def run_ppo(cfg, reward_fn, p: PPO, prompts, policy=None, ref=None, k=4):
    tok = models.load_tokenizer(SFT.policy)
    policy = policy or models.load_policy(SFT.policy)
    ref = ref or models.load_policy(SFT.policy).eval().requires_grad_(False)
    value = models.load_reward_model(round_paths("r01").reward_model)
    torch.manual_seed(0)
    history = ppo.train(policy, ref, value, tok, prompts, reward_fn, p, k, cfg.generate, 16, seed=0)
    return policy, tok, history


def test_ppo_first_minibatch_has_ratio_one(scratch_project, monkeypatch):
    monkeypatch.chdir(scratch_project)
    cfg = config()
    prompts = rendered(cfg, "policy")[:16]
    policy = models.load_policy(SFT.policy)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    _, _, history = run_ppo(
        cfg, lambda p, r, *_: [1.0] * len(r), PPO(rollout_prompts=16, epochs=1.0, ppo_epochs=2), prompts, policy, ref
    )
    first = history[0]
    assert first["first_minibatch"]["ratio_max_dev"] < 1e-5  # nothing has been updated yet
    assert first["first_minibatch"]["clipfrac"] == 0


def test_stop_kl_ends_an_iteration_once_the_policy_moved_too_far_from_its_rollouts(scratch_project, monkeypatch):
    """A learning rate 30x the default: unguarded, every planned minibatch step runs and the policy drifts past
    0.05 nats per token from the one that sampled the batch; with stop_kl 0.05 the iteration ends at the first
    minibatch beyond it, and the next rollouts stay closer to the reference."""
    monkeypatch.chdir(scratch_project)
    cfg = config()
    prompts = rendered(cfg, "policy")[:32]
    runs = {}
    for stop in (None, 0.05):
        p = PPO(rollout_prompts=16, epochs=1.0, learning_rate=3e-3, stop_kl=stop, dual_clip=None)
        runs[stop] = run_ppo(cfg, lambda a, r, *_: [len(x.split()) / 10 for x in r], p, prompts)[2]
    planned = 4 * (16 * 4 // 16)  # ppo_epochs x minibatches of 16 among 16 prompts x k = 4
    free, guarded = runs[None], runs[0.05]
    assert [h["steps"] for h in free] == [planned, planned] and max(h["approx_kl"] for h in free) > 0.05
    assert guarded[0]["stopped"] and guarded[0]["steps"] < planned
    assert all(st["approx_kl"] <= 0.05 for h in guarded for st in h["minibatches"])  # none stepped on beyond it
    assert guarded[1]["kl"] < free[1]["kl"]  # the next rollouts: closer to the reference


def test_ppo_raises_a_toy_reward_for_one_word(scratch_project, monkeypatch):
    monkeypatch.chdir(scratch_project)
    cfg = config()
    prompts = rendered(cfg, "policy")

    def elephants(asked, responses, finished=None):  # reward: how often the response says "elephant"
        return [r.split().count("elephant") for r in responses]

    def mean_reward(policy, tok):
        torch.manual_seed(3)
        s = sampling.generate(policy, tok, prompts, 2, cfg.generate)
        return sum(elephants(None, s.responses)) / len(s.responses)

    p = PPO(kl_coef=0.0, rollout_prompts=32, epochs=2.0, learning_rate=1e-3, value_learning_rate=1e-3)
    tok = models.load_tokenizer(SFT.policy)
    before = mean_reward(models.load_policy(SFT.policy), tok)
    policy, tok, history = run_ppo(cfg, elephants, p, prompts)
    assert mean_reward(policy, tok) > before + 0.3, (before, [h["score"] for h in history])


# --- every method through the step function -------------------------------------------------------


@pytest.mark.parametrize("method", ["ppo", "rest", "rloo"])
def test_each_method_raises_the_proxy_reward(scratch_project, monkeypatch, method):
    from tasks.update_policy import update_policy

    monkeypatch.chdir(scratch_project)
    cfg = config(
        {
            "update_policy": {
                "method": method,
                "ppo": {"learning_rate": 0.001, "value_learning_rate": 0.001},
                "rest": {"learning_rate": 0.001},
                "rloo": {"learning_rate": 0.001},
            }
        }
    )
    summary = update_policy(cfg, "r01")
    assert summary["method"] == method
    prompts = rendered(cfg, "policy")
    rm, tok = models.load_reward_model(round_paths("r01").reward_model), models.load_tokenizer(SFT.policy)
    means = {}
    for name, folder in (("before", SFT.policy), ("after", round_paths("r01").policy)):
        torch.manual_seed(1)
        s = sampling.generate(models.load_policy(folder), tok, prompts, 4, cfg.generate)
        means[name] = sampling.reward_scores(rm, tok, [prompts[i] for i in s.prompt_index], s.responses).mean()
    assert means["after"] > means["before"] + 0.1, means


@pytest.mark.parametrize("unfinished", ["drop", "penalty"])
def test_rest_ranks_cut_samples_as_every_method_scores_them(scratch_project, monkeypatch, unfinished):
    """Rollouts of 8 tokens leave many samples cut. drop: the quantiles are taken among the finished ones alone,
    so a threshold t selects n - ceil(t n) of the n finished; penalty (large): every cut sample ranks below every
    finished one. Scoring cut samples as finished, as ReST once did, selects other counts."""
    import math

    from tasks.update_policy import update_policy

    monkeypatch.chdir(scratch_project)
    t = 0.5
    change = {
        "method": "rest",
        "unfinished": unfinished,
        "missing_eos_penalty": 100.0,
        "rollouts": {"max_new_tokens": 8},
    }
    summary = update_policy(config({"update_policy": change | {"rest": {"thresholds": [t]}}}), "r01")
    n, total = summary["finished"], summary["samples"]
    assert 0 < n < total, summary  # some cut, some not: the case at hand
    [step] = summary["improve_steps"]
    expected = n - math.ceil(t * n) if unfinished == "drop" else min(n, total - math.ceil(t * total))
    assert step["samples"] == expected, (summary, expected)


# --- initialisation -------------------------------------------------------------------------------


def two_rounds(change: dict) -> Config:
    return config(deep_update({"rounds": {"r01": "r00", "r02": "r01"}}, {"update_policy": change}))


def test_init_sft_last_and_liti_weights(scratch_project, monkeypatch):
    from rlhf.ml.policy import initial_policy

    monkeypatch.chdir(scratch_project)
    sft, last = weights(models.load_policy(SFT.policy)), weights(models.load_policy(round_paths("r01").policy))
    assert any(not torch.equal(sft[k], last[k]) for k in sft)  # r01 moved away from SFT
    cases = {
        "sft": ({"init": "sft"}, sft),
        "last": ({"init": "last"}, last),
        "liti eta=1": ({"init": "liti", "eta": 1.0}, last),
        "liti eta=0": ({"init": "liti", "eta": 0.0}, sft),
    }
    for name, (change, expected) in cases.items():
        got = weights(initial_policy(two_rounds(change), "r02"))
        assert all(torch.equal(got[k], expected[k]) for k in expected), name  # exactly, not approximately
    half = weights(initial_policy(two_rounds({"init": "liti", "eta": 0.5}), "r02"))
    assert all(torch.allclose(half[k], (sft[k] + last[k]) / 2, atol=1e-6) for k in sft)
    assert all(torch.equal(v, sft[k]) for k, v in weights(initial_policy(two_rounds({"init": "liti"}), "r01")).items())


def test_reference_is_sft_or_the_initial_policy(scratch_project, monkeypatch):
    from rlhf.ml.policy import reference

    monkeypatch.chdir(scratch_project)
    last = weights(models.load_policy(round_paths("r01").policy))
    ref = reference(two_rounds({"init": "last", "ref": "init"}), "r02")
    assert not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(v, last[k]) for k, v in weights(ref).items())
    sft = weights(models.load_policy(SFT.policy))
    assert all(torch.equal(v, sft[k]) for k, v in weights(reference(two_rounds({"ref": "sft"}), "r02")).items())


# --- LoRA and co-training -------------------------------------------------------------------------


def test_lora_round_stores_only_an_adapter_that_reloads_and_generates(scratch_project, monkeypatch):
    from tasks.update_policy import update_policy

    monkeypatch.chdir(scratch_project)
    cfg = config({"update_policy": {"lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]}}})
    summary = update_policy(cfg, "r01")
    out = round_paths("r01").policy
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert not (out / "ref").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(SFT.policy)
    full = sum(p.numel() for p in models.load_policy(SFT.policy).parameters())
    assert summary["trainable_parameters"] < full / 10
    policy, tok = models.load_policy(out), models.load_tokenizer(out)
    s = sampling.generate(policy, tok, ["user : describe the ocean . assistant :"], 3, cfg.generate)
    assert all(len(ids) > 0 for ids in s.response_ids)
    merged, sft = weights(policy), weights(models.load_policy(SFT.policy))
    assert any(not torch.equal(merged[k], sft[k]) for k in sft)  # the adapter changed the weights

    from rlhf.ml.policy import trainable_policy

    cont = trainable_policy(two_rounds({"lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]}}), "r02")
    lora = {k: v for k, v in cont.named_parameters() if "lora_" in k}
    assert lora and all(v.requires_grad for v in lora.values())  # round 2 continues round 1's adapter
    assert any(float(v.detach().abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k)


def test_aux_takes_one_batch_after_every_ratio_update_batches():
    rows = [{"prompt": "p", "completion": str(i)} for i in range(5)]
    aux = Aux(rows, CoTrain(ratio=3), tok=None, batch_size=4, max_length=64, seed=0)
    got = [aux.after_update_batch(8) for _ in range(10)]
    assert [g is not None for g in got] == [False, False, True] * 3 + [False]
    assert aux.counts() == {
        "update_batches": 10,
        "update_examples": 80,
        "aux_batches": 3,
        "aux_examples": 12,
        "ratio": 3,
    }
    assert all(len(g) == 4 for g in got if g)


@pytest.mark.parametrize("method", ["dpo", "ppo", "rest"])
def test_cotraining_uses_auxiliary_and_update_examples_at_the_ratio(scratch_project, monkeypatch, method):
    from tasks.update_policy import update_policy

    monkeypatch.chdir(scratch_project)
    cfg = config(
        {
            "update_policy": {
                "method": method,
                "cotrain": {"ratio": 2},
                "ppo": {"rollout_prompts": 32, "epochs": 0.5, "ppo_epochs": 1},
            }
        }
    )
    summary = update_policy(cfg, "r01")
    c = summary["cotrain"]
    if method == "rest":  # mixed data: one auxiliary row per `ratio` selected samples, in every improve step
        steps = summary["improve_steps"]
        assert all(s["aux"] == s["samples"] // 2 for s in steps)
        assert c["aux_examples"] == sum(s["aux"] for s in steps) > 0
        assert c["update_examples"] == sum(s["samples"] for s in steps)
    else:
        assert c["update_batches"] > 0 and c["aux_batches"] == c["update_batches"] // 2
        assert c["aux_examples"] == c["aux_batches"] * cfg.update_policy.batch_size
        assert c["update_examples"] / c["aux_examples"] == pytest.approx(2, rel=0.15)


def test_ppo_at_temperature_0_7_scores_the_tempered_distribution_it_sampled(scratch_project, monkeypatch):
    """Rollouts drawn at 0.7: their log-probs are of softmax(logits / 0.7), checked one sequence at a time on
    the full logits, and the first minibatch's ratio is 1 (sampling and scoring agree)."""
    monkeypatch.chdir(scratch_project)
    cfg = config()
    s = cfg.generate.model_copy(update={"temperature": 0.7})
    tok, policy = models.load_tokenizer(SFT.policy), models.load_policy(SFT.policy).eval()
    ref = models.load_policy(SFT.policy).eval().requires_grad_(False)
    value = models.load_reward_model(round_paths("r01").reward_model).eval()
    torch.manual_seed(0)
    prompts = rendered(cfg, "policy")[:4]
    r = ppo.rollout(policy, ref, value, tok, prompts, lambda p, x, *_: [0.0] * len(x), PPO(), 2, s, 0.05, 8, None)
    with torch.no_grad():
        for j in range(len(r.ids)):
            start, n = int(r.start[j]), int(r.length[j])
            logits = policy(r.ids[j : j + 1, : start + n]).logits[0, start - 1 : start + n - 1]
            tempered = torch.log_softmax(logits / 0.7, -1).gather(1, r.ids[j, start : start + n, None])[:, 0]
            assert torch.allclose(r.logp[j, :n], tempered, atol=1e-5)
            assert not torch.allclose(
                r.logp[j, :n],
                torch.log_softmax(logits, -1).gather(1, r.ids[j, start : start + n, None])[:, 0],
                atol=1e-3,
            )
    _, stats = ppo.ppo_step(policy, value, r, torch.arange(len(r.ids)), PPO())
    assert stats["ratio_max_dev"] < 1e-5


def test_on_policy_methods_refuse_top_k_and_top_p_rollouts():
    from rlhf.core.config import Config

    base = {"rounds": {"r01": "r00"}, "generate": {"top_k": 20}}
    assert Config.model_validate(base).rollouts().top_k == 20  # dpo samples as generate does
    for method in ("ppo", "rloo"):
        with pytest.raises(ValueError, match=rf"update_policy.rollouts.top_k\] {method} scores"):
            Config.model_validate({**base, "update_policy": {"method": method}})
    ok = Config.model_validate(
        {**base, "update_policy": {"method": "ppo", "rollouts": {"top_k": 0, "temperature": 0.7}}}
    )
    assert (ok.rollouts().top_k, ok.rollouts().temperature, ok.generate.top_k) == (0, 0.7, 20)


def test_pairs_are_made_of_finished_responses_only():
    from rlhf.ml.pairs import pairs_of

    scores = np.array([[0.9, 0.1, 0.5], [0.3, 0.2, 0.8]])
    finished = np.array([[False, True, True], [True, False, False]])  # the 0.9 was cut off; row 2 has one
    assert [x.tolist() for x in pairs_of(scores, "best_worst", "skip", finished)] == [[0], [2], [1]]
    assert [x.tolist() for x in pairs_of(scores, "all_pairs", "skip", finished)] == [[0], [2], [1]]
    assert [x.tolist() for x in pairs_of(scores, "best_worst", "skip")] == [[0, 1], [0, 2], [1, 1]]


def test_a_ppo_round_forced_to_collapse_raises_the_kl_spike_and_regression_alarms(scratch_project, monkeypatch):
    """A learning rate far too high (0.05): the guards cannot help (a minibatch step is taken before any KL is
    seen), and the round must say so in metrics.json: a KL spike between update iterations (from the rollout KLs
    kept beside the weights, training.json), and gold lost against r00 beyond 3 standard errors."""
    from tasks.evaluate import evaluate
    from tasks.update_policy import update_policy

    monkeypatch.chdir(scratch_project)
    ppo_params = {"learning_rate": 0.05, "rollout_prompts": 16}
    cfg = config({"update_policy": {"method": "ppo", "ppo": ppo_params}})
    summary = update_policy(cfg, "r01")
    assert json.loads(round_paths("r01").training.read_text())["rollout_kl"] == summary["rollout_kl"]
    metrics = evaluate(cfg, "r01")
    assert any(a.startswith("KL spike in update_policy@r01, iteration ") for a in metrics["alarms"]), summary
    assert any(a.startswith("regression: gold fell below r00's") for a in metrics["alarms"]), metrics["alarms"]
