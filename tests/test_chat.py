"""Chat models and conversational data: a Qwen2-style ChatML base fine-tuned by prepare on a conversational
SFT set, prompts from parquet `messages` conversations, and a GPT-NeoX chat-template gold RM with its own
tokenizer; one round of every step, in-process."""

from __future__ import annotations

import json

import pytest
import yaml

from rlhf.core.errors import UserError
from rlhf.core.io import read_jsonl
from rlhf.core.paths import SFT, round_paths
from tests import chat_models
from tests.conftest import ROOT, TINY, deep_update, make_project, run_round


def chat_project(dest, kind: str = "qwen2", method: str = "dpo"):
    """A project whose policy is a `kind` chat base SFT'd by prepare on a conversational set, with parquet
    `messages` prompt sets and a GPT-NeoX chat-template gold RM: prepare and two rounds run in-process."""
    project = make_project(dest, TINY)
    texts = chat_models.questions(ROOT)[:2000] + (ROOT / "data" / "pretrain.txt").read_text().splitlines()[:2000]
    chat_models.chat_policy(project / "base", texts, kind)
    chat_models.chat_judge(project / "judge", texts)
    chat_models.conversational_sft(ROOT, project / "data" / "sft_chat.jsonl")
    sets = {}
    for split, n in (("label", 48), ("policy", 32), ("eval", 16)):
        path = project / "data" / "prompts" / f"{split}.parquet"
        chat_models.conversational_prompts(ROOT, path, split, n, system=split != "policy")
        sets[split] = {"path": f"data/prompts/{split}.parquet", "column": "messages"}
    params = yaml.safe_load((project / "params.yaml").read_text())
    change = {
        "rounds": {"r01": "r00", "r02": "r01"},
        "prepare": {"base": "base", "sft": "data/sft_chat.jsonl", "sft_epochs": 4.0, "learning_rate": 0.005},
        "prompts": sets,
        "label": {"judge": {"type": "hf", "name": "judge", "input": "chat"}},
        "generate": {"max_new_tokens": 40},
        "update_policy": {
            "method": method,
            "ppo": {"rollout_prompts": 16},
            "rest": {"thresholds": [0.5]},
        },
        "evaluate": {"landscape": {"axes": {}}, "max_new_tokens": 40},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(deep_update(params, change), sort_keys=False))
    return project, run_round(project, ("r01", "r02"))


@pytest.fixture(scope="module")
def qwen2_project(tmp_path_factory):
    return chat_project(tmp_path_factory.mktemp("chat") / "project")


@pytest.fixture
def in_chat(qwen2_project, monkeypatch):
    monkeypatch.chdir(qwen2_project[0])
    return qwen2_project[1]


def judge_forward(conversation: list[dict], response: str) -> float:
    """The gold judge of the chat projects run directly on its own rendering of the conversation."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained("judge")
    rm = AutoModelForSequenceClassification.from_pretrained("judge").eval()
    text = tok.apply_chat_template([*conversation, {"role": "assistant", "content": response}], tokenize=False)
    assert "<|im_start|>" not in text and "<|eot_id|>" not in text and text.startswith(("<|user|>", "<|system|>"))
    with torch.no_grad():
        return float(rm(**tok(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0])


def test_prompts_are_rendered_by_the_policys_template_and_responses_end_at_its_end_of_turn(in_chat):
    from rlhf.ml import models

    rows = read_jsonl(round_paths("r01").samples)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)
    with_system = [r for r in rows if r["messages"][0]["role"] == "system"]
    assert with_system and all(r["prompt"].startswith("<|im_start|>system\nanswer in short") for r in with_system)
    assert all(r["prompt"].startswith("<|im_start|>user\n") for r in rows if r["messages"][0]["role"] == "user")
    # prepare's SFT taught the base its template: most answers end at <|im_end|>, which is no part of the text.
    assert sum(r["finished"] for r in rows) / len(rows) > 0.6
    assert not any("<|im_end|>" in r["response"] for r in rows)
    tok = models.load_tokenizer(SFT.policy)
    assert tok.chat_template == chat_models.CHATML and tok.eos_token == "<|im_end|>"
    metrics = json.loads(round_paths("r01").metrics.read_text())
    assert metrics["finished"] > 0.3 and metrics["prompt_set"]["column"] == "messages"
    assert {r["policy_round"] for r in read_jsonl(round_paths("r02").samples)} == {"r01"}  # the second round


def test_the_gold_judge_scores_its_own_rendering_of_the_conversation(in_chat):
    for row in read_jsonl(round_paths("r01").labels)[:6]:
        for response, gold in zip(row["responses"], row["gold"]):
            assert gold == pytest.approx(judge_forward(row["messages"], response), abs=1e-4)


def test_the_proxy_rm_scores_the_rendered_conversation_the_policy_produced(in_chat):
    from rlhf.ml import models

    tok = models.load_tokenizer(round_paths("r01").reward_model)
    rm = models.load_reward_model(round_paths("r01").reward_model).eval()
    row = read_jsonl(round_paths("r01").eval_samples)[0]
    import torch

    ids = tok(row["prompt"] + row["response"] + (tok.eos_token if row["finished"] else ""), return_tensors="pt")
    assert tok.decode(ids["input_ids"][0][:2]) == "<|im_start|>" + row["messages"][0]["role"]
    with torch.no_grad():
        assert row["proxy"] == pytest.approx(float(rm(**ids).logits[0, 0]), abs=1e-4)


@pytest.mark.parametrize("method, kind", [("ppo", "qwen2"), ("rest", "qwen2"), ("rloo", "llama3")])
def test_two_rounds_of_each_method_on_a_chat_policy(method, kind, tmp_path, monkeypatch):
    from rlhf.ml import models

    project, summaries = chat_project(tmp_path / "project", kind, method)
    monkeypatch.chdir(project)
    assert summaries["update_policy"]["method"] == method
    generation_prompt = "<|im_start|>assistant\n" if kind == "qwen2" else "<|end_header_id|>\n\n"
    tok = models.load_tokenizer(round_paths("r02").policy)
    rm = models.load_reward_model(round_paths("r02").reward_model).eval()
    for rnd in ("r01", "r02"):
        metrics = json.loads(round_paths(rnd).metrics.read_text())
        rows = read_jsonl(round_paths(rnd).eval_samples)
        assert all(r["prompt"].endswith(generation_prompt) for r in rows)
        assert metrics["finished"] > 0.5, (rnd, metrics["finished"])  # most answers end at the end of turn
        assert not any(tok.eos_token in r["response"] for r in rows)
    for row in rows[:3]:  # round 2's held-out scores: the judge's own forward, the proxy's on the rendered text
        assert row["gold"] == pytest.approx(judge_forward(row["messages"], row["response"]), abs=1e-4)
        import torch

        with torch.no_grad():
            end = tok.eos_token if row["finished"] else ""  # a response cut off is scored without an eos
            ids = tok(row["prompt"] + row["response"] + end, return_tensors="pt")
            assert row["proxy"] == pytest.approx(float(rm(**ids).logits[0, 0]), abs=1e-4)


def test_a_template_that_writes_the_bos_is_not_given_two(tmp_path):
    from rlhf.ml import chat, models

    chat_models.chat_policy(tmp_path / "llama3", ["what is the ocean ?", "the ocean is blue ."] * 50, "llama3")
    tok = models.load_tokenizer(tmp_path / "llama3")
    assert tok.pad_token == tok.eos_token == "<|eot_id|>"  # no pad token: it pads with the eos
    [text] = chat.render(tok, [[{"role": "user", "content": "what is the ocean ?"}]])
    ids = tok(text)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_prompt_sets_from_datasets_formats_and_their_errors(tmp_path):
    import datasets

    from rlhf.core.config import PromptSet
    from rlhf.core.prompts import read_prompts

    convo = [{"role": "user", "content": "describe the ocean ."}]
    uf = [
        {"prompt": "describe the ocean .", "chosen": [*convo, {"role": "assistant", "content": "blue ."}]},
        {"prompt": "describe the city .", "chosen": [{"role": "user", "content": "describe the city ."}]},
    ]
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(uf)}).save_to_disk(str(tmp_path / "uf"))
    rows = read_prompts(PromptSet(path=str(tmp_path / "uf"), split="train_prefs", column="chosen"))
    assert [r["prompt"] for r in rows][0] == convo  # the answer is cut off the conversation
    assert len({r["id"] for r in rows}) == 2  # ids from the content
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "prompt": "describe the ocean ."}) + "\n")
    assert read_prompts(str(tmp_path / "p.jsonl"))[0]["prompt"] == "describe the ocean ."
    datasets.Dataset.from_list(uf).to_parquet(str(tmp_path / "uf.parquet"))
    assert len(read_prompts(PromptSet(path=str(tmp_path / "uf.parquet")))) == 2
    with pytest.raises(UserError, match=r"prompts.label.column: .* has no column 'messages' \(columns: prompt, chosen"):
        read_prompts(PromptSet(path=str(tmp_path / "uf.parquet"), column="messages"), "prompts.label")
    with pytest.raises(UserError, match=r"no split 'test' \(its splits: train_prefs\)"):
        read_prompts(PromptSet(path=str(tmp_path / "uf"), split="test"), "prompts.eval")
    bad = [{"prompt": [{"role": "assistant", "content": "hi"}]}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(UserError, match="row 1: the conversation has no user turn"):
        read_prompts(PromptSet(path=str(tmp_path / "bad.parquet")))


def test_chat_mistakes_fail_the_checks_in_one_line_naming_the_key(tmp_path):
    """What `rlhf check` catches before any model is trained: conversations without a template, a template
    that refuses a system turn, a policy that names no eos, a chat judge without a template."""
    import subprocess

    from transformers import AutoTokenizer, GenerationConfig

    from tests.conftest import BIN

    project = make_project(tmp_path / "project", TINY)
    texts = chat_models.questions(ROOT)[:500]
    chat_models.chat_judge(project / "judge", texts)
    chat_models.conversational_prompts(ROOT, project / "data" / "label.parquet", "label", 8, system=True)
    for name in ("plain", "no_system", "no_eos"):
        chat_models.chat_policy(project / name, texts)
        tok = AutoTokenizer.from_pretrained(project / name)
        if name == "plain":
            tok.chat_template = None
            (project / name / "chat_template.jinja").unlink()
        elif name == "no_system":  # as Gemma's and some Mistral templates do
            tok.chat_template = (
                "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                + tok.chat_template
            )
        else:
            tok.pad_token, tok.eos_token = "<|endoftext|>", None
            GenerationConfig().save_pretrained(project / name)
        tok.save_pretrained(project / name)
    (project / "judge" / "chat_template.jinja").unlink(missing_ok=True)
    judge = AutoTokenizer.from_pretrained(project / "judge")
    judge.chat_template = None
    judge.save_pretrained(project / "judge")

    def check(change: dict) -> str:
        params = deep_update(yaml.safe_load((project / "params.yaml").read_text()), change)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        out = subprocess.run([BIN / "rlhf", "check"], cwd=project, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        [line] = out.stderr.strip().splitlines()
        return line

    label = {"prompts": {"label": {"path": "data/label.parquet", "column": "messages"}}}
    assert check({**label, "prepare": {"policy": "plain"}}).startswith(
        "error: prompts.label: conversational prompts need a policy with a chat template"
    )
    assert check({"prepare": {"policy": "no_system"}}).startswith(
        "error: prompts.label: prompt 2: the policy's chat template refuses it: System role not supported"
    )
    assert check({"prompts": {"label": "data/prompts/label.jsonl"}, "prepare": {"policy": "no_eos"}}).startswith(
        "error: prepare.policy: no_eos: the policy names no eos or end-of-turn token"
    )
    assert check(
        {"prepare": {"policy": "tiny"}, "label": {"judge": {"type": "hf", "name": "judge", "input": "chat"}}}
    ) == ("error: label.judge.input: chat, but judge has no chat template; use input: template or pair")


def test_a_bf16_policy_is_trained_and_saved_in_bf16_in_every_model_a_round_writes(tmp_path):
    """A Hub model in bfloat16 stays in it: the round's policy and reward model are written in the dtype they
    trained in, not widened to float32 (twice the disk at 7B)."""
    import json
    import struct

    import torch

    project = make_project(tmp_path / "project", TINY)
    texts = chat_models.questions(ROOT)[:500]
    chat_models.chat_policy(project / "policy", texts, dtype=torch.bfloat16)
    params = yaml.safe_load((project / "params.yaml").read_text())
    change = {"prepare": {"policy": "policy"}, "evaluate": {"landscape": {"axes": {}}}}
    (project / "params.yaml").write_text(yaml.safe_dump(deep_update(params, change), sort_keys=False))
    run_round(project)

    def dtypes(folder):
        data = (project / folder / "model.safetensors").read_bytes()
        header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
        return {v["dtype"] for k, v in header.items() if k != "__metadata__"}

    for folder in ("data/rounds/r00/policy", "data/rounds/r01/policy", "data/rounds/r01/reward_model"):
        assert dtypes(folder) == {"BF16"}, folder
    # round 0's base is the given policy itself: the same file on disk, not a copy (train_rm.init: base reads it)
    weights = [project / f"data/rounds/r00/{name}/model.safetensors" for name in ("base", "policy")]
    assert weights[0].stat().st_ino == weights[1].stat().st_ino
