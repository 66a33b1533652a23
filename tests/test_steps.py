"""Each step on a tiny model, on CPU: it writes what it should, and changes what it should."""

import json

import numpy as np
import pytest

from rlhf.core.errors import UserError
from rlhf.core.io import read_jsonl
from rlhf.core.paths import SFT, round_paths
from rlhf.core.prompts import read_prompts
from rlhf.judges import make_judge
from rlhf.ml import chat, models, sampling
from rlhf.ml.pairs import best_worst
from tests.conftest import rendered


def test_prepare_builds_loadable_models_below_the_best(in_project):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder in (SFT.base, SFT.policy):
        assert (folder / "model.safetensors").is_file()
        AutoModelForCausalLM.from_pretrained(folder)  # the hub code path
        assert AutoTokenizer.from_pretrained(folder).pad_token == "<pad>"
    metrics = json.loads(SFT.metrics.read_text())
    assert metrics["finished"] > 0.5  # SFT taught it to stop (an untrained model almost never does)
    assert 0.2 < metrics["gold"]["mean"] < metrics["gold"]["best"] - 0.1
    assert metrics["kl"]["per_sequence"] == 0.0


def test_generate_writes_k_samples_per_prompt_deterministically(in_project):
    from tasks.generate import generate

    rows = read_jsonl(round_paths("r01").samples)
    prompts = read_prompts(in_project.prompts.label)
    assert len(rows) == len(prompts) * in_project.generate.k
    assert {r["policy_round"] for r in rows} == {"r00"}
    assert rows[0]["sampling"]["temperature"] == in_project.generate.temperature
    before = round_paths("r01").samples.read_bytes()
    generate(in_project, "r01")
    assert round_paths("r01").samples.read_bytes() == before  # seeded: the same samples again


def test_label_pairs_best_over_worst_by_gold(in_project):
    rows = read_jsonl(round_paths("r01").labels)
    judge = make_judge(in_project)
    for row in rows:
        assert len(row["gold"]) == len(row["responses"]) == in_project.generate.k
        # best_worst among the finished responses (label.unfinished: drop), ties skipped, no noise: at most one
        # pair, the best finished one over the worst
        gold = [g for g, done in zip(row["gold"], row["finished"]) if done]
        for pair in row["pairs"]:
            chosen, rejected = judge.score([row["messages"]] * 2, [pair["chosen"], pair["rejected"]])
            assert chosen == max(gold) == pair["chosen_gold"] and rejected == min(gold) < chosen
            assert pair["margin"] == pytest.approx(chosen - rejected) and not pair["flipped"]
        assert len(row["pairs"]) == (len(gold) >= 2 and max(gold) > min(gold))


def held_out_pairs(cfg, policy_dir, k=4):
    """Best-vs-worst pairs by gold on the held-out prompts, sampled from a policy."""
    tok, policy = models.load_tokenizer(policy_dir), models.load_policy(policy_dir)
    prompts = rendered(cfg, "eval", tok)
    s = sampling.generate(policy, tok, prompts, k, cfg.generate)
    asked = [prompts[i] for i in s.prompt_index]
    gold = make_judge(cfg).score(asked, s.responses).reshape(len(prompts), k)
    best, worst, valid = best_worst(gold)
    return tok, [
        (prompts[i], s.responses[i * k + b], s.responses[i * k + w])
        for i, (b, w, ok) in enumerate(zip(best, worst, valid))
        if ok
    ]


def rm_accuracy(rm, tok, pairs):
    p, c, r = zip(*pairs)
    return float(np.mean(sampling.reward_scores(rm, tok, p, c) > sampling.reward_scores(rm, tok, p, r)))


def test_train_rm_ranks_held_out_gold_pairs_better_than_chance(in_project):
    import torch

    torch.manual_seed(0)
    tok, pairs = held_out_pairs(in_project, SFT.policy)
    assert len(pairs) >= 15
    trained = models.load_reward_model(round_paths("r01").reward_model)
    assert rm_accuracy(trained, tok, pairs) >= 0.65


def test_update_policy_raises_the_proxy_reward(in_project):
    import torch

    prompts = rendered(in_project, "policy")
    rm = models.load_reward_model(round_paths("r01").reward_model)
    tok = models.load_tokenizer(SFT.policy)
    means = {}
    for name, folder in (("before", SFT.policy), ("after", round_paths("r01").policy)):
        torch.manual_seed(1)
        s = sampling.generate(models.load_policy(folder), tok, prompts, 4, in_project.generate)
        means[name] = sampling.reward_scores(rm, tok, [prompts[i] for i in s.prompt_index], s.responses).mean()
    assert means["after"] > means["before"] + 0.1, means


def test_evaluate_writes_metrics_with_kl_and_proxy(in_project):
    m = json.loads(round_paths("r01").metrics.read_text())
    assert m["round"] == "r01" and m["gold"]["count"] == 24 * in_project.evaluate.samples_per_prompt
    gold = [r["gold"] for r in read_jsonl(round_paths("r01").eval_samples)]  # the scores the statistics summarise
    assert m["gold"]["mean"] == pytest.approx(sum(gold) / len(gold))
    assert m["gold"]["sem"] == pytest.approx(np.std(gold, ddof=1) / len(gold) ** 0.5)
    assert m["kl"]["per_sequence"] > 0  # DPO moved the policy away from its SFT reference
    assert "proxy" in m and np.isfinite(m["proxy"]["mean"])
    assert m["proxy_accuracy"]["pairs"] > 10 and m["proxy_accuracy"]["mean"] > 0.55, m[
        "proxy_accuracy"
    ]  # agrees with gold


def test_kl_is_positive_to_another_policy_and_independent_of_padding(in_project):
    # (its exact value, in both directions, is checked by brute force in tests/test_reference_math.py)
    tok, sft = models.load_tokenizer(SFT.policy), models.load_policy(SFT.policy)
    prompts = ["user : describe the ocean . assistant :", "user : talk about the city now . assistant :"]
    s = sampling.generate(sft, tok, prompts, 3, in_project.generate)
    updated = models.load_policy(round_paths("r01").policy)
    kl = sampling.sequence_kl(updated, sft, tok, prompts, s)[0]
    assert (kl > 0).all()
    assert torch_allclose(kl, sampling.sequence_kl(updated, sft, tok, prompts, s, batch_size=2)[0])  # other padding
    logp, mask = sampling.response_logprobs(
        sft, *sampling.pack(tok, [prompts[i] for i in s.prompt_index], s.response_ids), grad=False
    )
    assert (logp <= 0).all() and mask.sum(1).tolist() == [len(r) for r in s.response_ids]


def torch_allclose(a, b):
    import torch

    return torch.allclose(a, b, atol=1e-4)


def test_prompts_over_the_limit_are_dropped_or_cut_to_their_last_tokens():
    tok = models.build_tokenizer(["a b c d e f g h i j"])
    long = " ".join("abcdefghij") * 5000  # 100,000 characters
    kept, texts, over = chat.fit_prompts(tok, ["a b", long], 8, "drop", "prompts.label")
    assert (kept, texts, over) == ([0], ["a b"], 1)
    kept, texts, over = chat.fit_prompts(tok, ["a b", long], 8, "truncate", "prompts.label")
    assert kept == [0, 1] and over == 1 and texts[0] == "a b"
    assert texts[1] == "c d e f g h i j" and long.endswith(texts[1])  # its last 8 tokens, at a token boundary
    with pytest.raises(UserError, match="prompts.eval: every prompt is longer than prompts.max_prompt_length"):
        chat.fit_prompts(tok, [long], 8, "drop", "prompts.eval")


@pytest.mark.parametrize("too_long", ["drop", "truncate"])
def test_a_50000_character_prompt_never_reaches_the_model_whole(tiny_project, tmp_path, monkeypatch, too_long):
    import shutil

    import yaml

    from rlhf.core.config import load_config
    from tasks.generate import generate

    project = tmp_path / "project"
    shutil.copytree(tiny_project, project, symlinks=True)
    monkeypatch.chdir(project)
    long = " ".join(["the ocean is blue ."] * 2700)  # 51,300 characters of words the tokenizer knows
    with open("data/prompts/label.jsonl", "a") as f:
        f.write(json.dumps({"id": "huge", "prompt": long}) + "\n")
    params = yaml.safe_load(open("params.yaml"))
    params["prompts"].update(max_prompt_length=64, too_long=too_long)
    open("params.yaml", "w").write(yaml.safe_dump(params))
    summary = generate(load_config(), "r01")
    assert summary[f"prompts_{too_long}"] == 1
    huge = [r for r in read_jsonl(round_paths("r01").samples) if r["prompt_id"] == "huge"]
    tok = models.load_tokenizer(SFT.policy)
    if too_long == "drop":
        assert huge == []
    else:
        # Cut from the left: the rendered turn keeps its end, the question's last words and the generation prompt.
        kept = [r["prompt"].removesuffix(" assistant :") for r in huge]
        assert huge and all(len(tok(r["prompt"])["input_ids"]) <= 64 for r in huge)
        assert all(r["prompt"].endswith(" assistant :") and long.endswith(k) for r, k in zip(huge, kept))


def test_report_to_tensorboard_leaves_a_run_per_round_and_step(tiny_project, tmp_path, monkeypatch):
    import shutil

    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhf.core.config import load_config
    from tasks.evaluate import evaluate
    from tasks.train_rm import train_rm
    from tasks.update_policy import update_policy

    project = tmp_path / "project"
    shutil.copytree(tiny_project, project, symlinks=True)
    monkeypatch.chdir(project)
    params = yaml.safe_load(open("params.yaml"))
    params["runtime"]["report_to"] = "tensorboard"
    params["update_policy"]["method"] = "ppo"  # the project's own loop reports too, not only TRL's trainers
    params["update_policy"]["ppo"] = {"rollout_prompts": 16, "epochs": 0.5, "ppo_epochs": 1}  # two iterations
    open("params.yaml", "w").write(yaml.safe_dump(params))
    cfg = load_config()
    for step in (train_rm, update_policy, evaluate):
        step(cfg, "r01")

    def scalars(run: str) -> set[str]:
        events = EventAccumulator(str(project / "logs" / run))
        events.Reload()
        return set(events.Tags()["scalars"])

    assert {"train/loss"} <= scalars("r01-train_rm")
    assert {"train/score", "train/kl", "train/beta", "train/clipfrac"} <= scalars("r01-update_policy")
    assert {"eval/gold/mean", "eval/proxy/mean", "eval/kl/per_sequence", "eval/finished"} <= scalars("rounds")


def test_no_pair_holds_a_response_that_was_cut_off_and_none_is_scored_with_an_eos(in_project):
    import torch

    rows = read_jsonl(round_paths("r01").labels)
    cut = {(r["prompt_id"], x) for r in rows for x, done in zip(r["responses"], r["finished"]) if not done}
    assert cut  # the tiny policy leaves some answers unfinished at max_new_tokens
    assert not any(
        (r["prompt_id"], p[side]) in cut for r in rows for p in r["pairs"] for side in ("chosen", "rejected")
    )
    tok = models.load_tokenizer(round_paths("r01").reward_model)
    rm = models.load_reward_model(round_paths("r01").reward_model).eval()
    prompt, response = rows[0]["prompt"], rows[0]["responses"][0]
    [finished, unfinished] = [
        sampling.reward_scores(rm, tok, [prompt], [response], [done])[0] for done in (True, False)
    ]
    with torch.no_grad():
        for text, score in ((prompt + response + tok.eos_token, finished), (prompt + response, unfinished)):
            assert score == pytest.approx(float(rm(**tok(text, return_tensors="pt")).logits[0, 0]), abs=1e-5)
