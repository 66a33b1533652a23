"""Scaling out on one CPU machine: a training step on 2 real gloo ranks under `accelerate launch` trains the same
reward model as 1 process, only rank 0 writes; labelling in 2 worker processes gives the same labels.jsonl as
1 (rubric and reward-model judges); a vLLM backend that cannot run is refused up front, naming the key."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf.core.config import load_config, parse_config
from rlhf.core.errors import UserError
from rlhf.core.io import read_jsonl, write_jsonl
from rlhf.core.paths import SFT, round_paths
from rlhf.core.prompts import read_prompts
from rlhf.ml import models
from tests.conftest import BIN, TINY, make_project

K = 4


def set_params(project, change: dict) -> None:
    from tests.conftest import deep_update

    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(deep_update(yaml.safe_load(path.read_text()), change), sort_keys=False))


def rlhf(project, *args, env=None):
    return subprocess.run(
        [BIN / "rlhf", *args], cwd=project, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("scale") / "project", TINY)
    build_round0_and_samples(project)
    return project


def build_round0_and_samples(project) -> None:
    """Round 0 built without training (an untrained tiny Llama is SFT policy and base) and round 1's samples:
    each label prompt with K SFT completions, which the rubric scores apart."""
    old = os.getcwd()
    os.chdir(project)
    try:
        cfg = load_config()
        sft = read_jsonl(cfg.prepare.sft)
        prompts = read_prompts(cfg.prompts.label)
        tok = models.build_tokenizer([r["prompt"] + r["completion"] for r in sft] + [p["prompt"] for p in prompts])
        torch.manual_seed(0)
        model = models.build_tiny_lm(tok, cfg.prepare.tiny)
        models.save(model, tok, SFT.base)
        models.save(model, tok, SFT.policy)
        write_jsonl(
            round_paths("r01").samples,
            [
                {
                    "prompt_id": p["id"],
                    "prompt": p["prompt"],
                    "messages": [{"role": "user", "content": p["prompt"]}],
                    "response": sft[(K * i + j) % len(sft)]["completion"],
                    "finished": True,
                }
                for i, p in enumerate(prompts)
                for j in range(K)
            ],
        )
    finally:
        os.chdir(old)


def label_with(cfg_change: dict, project, monkeypatch) -> bytes:
    from tasks.label import label

    monkeypatch.chdir(project)
    set_params(project, cfg_change)
    label(load_config(), "r01")
    return round_paths("r01").labels.read_bytes()


def test_two_label_workers_give_the_labels_of_one_with_the_rubric(project, monkeypatch, caplog):
    one = label_with({"label": {"workers": 1}}, project, monkeypatch)
    caplog.set_level("INFO", logger="rlhf")
    two = label_with({"label": {"workers": 2}}, project, monkeypatch)
    assert "in 2 worker processes" in caplog.text
    assert two == one
    assert len(read_jsonl(round_paths("r01").labels)) == 200


def test_two_label_workers_give_the_labels_of_one_with_a_reward_model_judge(project, tmp_path, monkeypatch):
    """A reward model scores in length-sorted batches; the workers get whole batches of that order, so each
    batch is padded as in one process and every score is bit for bit the same."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = models.load_tokenizer(project / SFT.policy)
    torch.manual_seed(1)
    judge = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
            num_labels=1,
        )
    )
    judge.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    spec = {"type": "hf", "name": str(tmp_path / "judge"), "batch_size": 24}
    one = label_with({"label": {"judge": spec, "workers": 1}}, project, monkeypatch)
    two = label_with({"label": {"judge": spec, "workers": 2}}, project, monkeypatch)
    assert two == one
    gold = [s for row in read_jsonl(round_paths("r01").labels) for s in row["gold"]]
    assert len(set(gold)) > 100  # the model's scores, not a constant


def test_train_rm_on_two_ranks_matches_one_process(project, monkeypatch):
    """train_rm.batch_size is the global batch: 2 ranks of 8 rows average their gradients (DDP over gloo) into
    the step one process takes on 16. 64 sampled pairs are 4 whole batches, so both runs take the same steps on
    the same rows; the weights then differ only by float32 rounding of the gradient reduction, which Adam's
    per-weight normalisation amplifies where gradients are tiny (measured: at most 2e-5), more than 100 times
    below how far training moved them (measured: 6e-3). A rank training alone on its half of each batch would
    differ by the order of the training itself."""
    label_with({"label": {"judge": {"type": "rubric", "name": "pink_elephant"}, "workers": 1}}, project, monkeypatch)
    # one thread per rank: 2 ranks fill 2 cores (the thread count changes results, so both runs use 1)
    set_params(
        project, {"runtime": {"threads": 1}, "train_rm": {"data": "sample", "sample_size": 64, "batch_size": 16}}
    )
    rm = project / round_paths("r01").reward_model
    weights, outs = {}, {}
    for n in (1, 2):
        set_params(project, {"runtime": {"num_processes": n}})
        out = rlhf(project, "train_rm", "r01")
        assert out.returncode == 0, out.stderr[-3000:]
        weights[n], outs[n] = load_file(rm / "model.safetensors"), out.stdout
    summaries = [json.loads(line) for line in outs[2].splitlines() if line.startswith('{"')]  # not TRL's dicts
    assert len(summaries) == 1 and summaries[0]["processes"] == 2  # two ranks ran; one of them reported
    assert "processes" not in json.loads(outs[1].splitlines()[-1])
    # Only rank 0 wrote: the one model folder, no scratch left beside it by another writer.
    assert sorted(p.name for p in rm.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not list(rm.parent.glob(".*"))
    start = load_file(project / SFT.policy / "model.safetensors")
    diff = max(float((weights[1][k] - weights[2][k]).abs().max()) for k in weights[1])
    moved = max(float((weights[1][k] - start[k]).abs().max()) for k in weights[1] if k in start)
    assert moved > 1e-3 and diff < moved / 100, (diff, moved)


def test_a_failing_rank_is_one_line_and_exit_2(project):
    set_params(
        project, {"runtime": {"num_processes": 2}, "rounds": {"r01": "r00", "r02": "r01"}, "train_rm": {"data": "last"}}
    )
    write_jsonl(project / round_paths("r02").labels, [{"prompt_id": "x", "prompt": "x", "pairs": []}])
    out = rlhf(project, "train_rm", "r02")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: data/rounds/r02/labels.jsonl: 0 preference pairs, need at least 2 (are all samples tied?)"
    )
    assert "Traceback" not in out.stderr and out.stderr.count("error:") == 1
    set_params(project, {"runtime": {"num_processes": 1}, "rounds": {"r01": "r00"}})


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"runtime": {"num_processes": 2}, "update_policy": {"method": "ppo"}},
            "runtime.num_processes: ppo (the project's own loop) runs in one process",
        ),
        (
            {"runtime": {"num_processes": 3}},
            "prepare.batch_size: the global batch is split over runtime.num_processes=3",
        ),
        ({"runtime": {"accelerate_config": "no/such.yaml"}}, "runtime.accelerate_config: no such file: no/such.yaml"),
        ({"label": {"workers": 0}}, "label.workers: input should be greater than 0"),
    ],
)
def test_scale_settings_that_cannot_run_are_refused_naming_the_key(change, message):
    with pytest.raises(UserError, match="^params.yaml: " + message.replace("(", r"\(").replace(")", r"\)")):
        parse_config({"rounds": {"r01": "r00"}, **change}, "params.yaml")


def test_vllm_backend_without_a_vllm_environment_is_refused_before_the_run(project, tmp_path):
    try:
        set_params(project, {"generate": {"backend": "vllm", "vllm_python": "no/such/python"}})
        for step in (["check"], ["generate", "r01"]):
            out = rlhf(project, *step)
            assert out.returncode == 2
            assert out.stderr.strip() == (
                "error: generate.vllm_python: no/such/python not found; `make install-vllm` makes .venv-vllm "
                "(docs/scaling.md), or use generate.backend: transformers"
            )
        set_params(project, {"generate": {"vllm_python": sys.executable}})  # a Python without vLLM: this one
        out = rlhf(project, "check")
        assert out.returncode == 2
        assert out.stderr.strip() == (
            f"error: generate.vllm_python: {sys.executable} has no vLLM installed; `make install-vllm` "
            "(docs/scaling.md), or use generate.backend: transformers"
        )
    finally:
        set_params(project, {"generate": {"backend": "transformers", "vllm_python": ".venv-vllm/bin/python"}})


def test_vllm_beside_sharded_training_is_refused_naming_the_key(tmp_path):
    config = tmp_path / "zero3.yaml"
    config.write_text("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 3}\nnum_processes: 2\n")
    change = {"rounds": {"r01": "r00"}, "generate": {"backend": "vllm"}}
    change["runtime"] = {"num_processes": 2, "accelerate_config": str(config)}
    with pytest.raises(UserError, match=r"^params.yaml: generate.backend: vllm is served the policy's whole weights"):
        parse_config(change, "params.yaml")
    change["runtime"] = {"num_processes": 2}  # DDP: each rank has the whole model, and its own engine
    assert parse_config(change, "params.yaml").generate.backend == "vllm"


@pytest.mark.slow
def test_a_round_through_the_flow_with_two_ranks_and_two_label_workers(tmp_path):
    """`rlhf run` as a user runs it: prepare, train_rm and update_policy as 2 ranks each inside their DVC
    stages, label in 2 workers; DVC records every stage and is clean afterwards."""
    project = make_project(
        tmp_path / "project", {**TINY, "runtime": {"threads": 1, "num_processes": 2}, "label": {"workers": 2}}
    )
    out = rlhf(project, "run")
    assert out.returncode == 0, out.stderr[-3000:]
    ranked = [
        json.loads(line[line.index('{"') :])
        for line in (out.stdout + out.stderr).splitlines()
        if '"processes": 2' in line
    ]  # a step's summary, as the flow logs it
    assert len(ranked) == 3, ranked  # prepare, train_rm, update_policy: one summary each, from rank 0
    assert "scoring 800 samples in 2 worker processes" in out.stdout + out.stderr
    status = subprocess.run([BIN / "dvc", "status"], cwd=project, capture_output=True, text=True).stdout
    assert "up to date" in status
    assert json.loads((project / "data/rounds/r01/metrics.json").read_text())["gold"]["mean"] > 0
