"""A new user's first real run, on this machine: a Qwen2-layout chat policy whose vocabulary has 151,936 rows
answers up to 256 new tokens at the default batch sizes, through `rlhf run` (Prefect and DVC), from a params.yaml
that names only what it changes. Its largest step process needs a small multiple of what the same round needs at
a 600-row vocabulary (before, evaluate alone was killed at 22 GB). Slow: about 10 minutes on 2 CPU cores."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from tests import chat_models
from tests.conftest import BIN, ROOT, make_project

pytestmark = pytest.mark.slow

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
COST = re.compile(r"(\w+) r0[01]: [\d,.]+ s, peak memory ([\d,]+) MiB")


def first_round(tmp_path, vocab: int) -> tuple[dict[str, float], dict]:
    """Each step's peak (MiB, from its own last log line) and round 1's metrics."""
    project = make_project(tmp_path / f"v{vocab}")
    chat_models.answering_policy(project / "policy", vocab, SHAPE, answer_tokens=256)
    chat_models.chat_judge(project / "judge", chat_models.questions(ROOT)[:2000])
    sets = {}
    for split in ("label", "policy", "eval"):  # 16 each: a batch of pairs, of DPO rows, 64 answers to evaluate
        path = project / "data" / "prompts" / f"{split}.parquet"
        chat_models.conversational_prompts(ROOT, path, split, 16)
        sets[split] = {"path": f"data/prompts/{split}.parquet", "column": "messages"}
    params = {  # every other key at its default: `rlhf run` writes them in
        "rounds": {"r01": "r00"},
        "prepare": {"policy": "policy"},
        "prompts": sets,
        "generate": {"max_new_tokens": 256},
        "label": {"judge": {"type": "hf", "name": "judge", "input": "chat"}, "unfinished": "keep"},
        "train_rm": {"max_length": 640},  # TRL drops longer pairs: a retokenised answer can be longer
        "update_policy": {"max_length": 640},
        "evaluate": {"max_new_tokens": 256},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([BIN / "rlhf", "run"], cwd=project, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    peaks = {m[1]: float(m[2].replace(",", "")) for m in COST.finditer(out.stdout + out.stderr)}
    assert set(peaks) == {"prepare", "generate", "label", "train_rm", "update_policy", "evaluate"}, peaks
    return peaks, json.loads((project / "data/rounds/r01/metrics.json").read_text())


def test_a_151936_row_vocabulary_and_256_token_answers_need_a_small_multiple_of_a_600_row_ones(tmp_path):
    small, _ = first_round(tmp_path, 600)
    large, metrics = first_round(tmp_path, 151_936)
    assert metrics["length"] > 128  # answers of real length: about half run to the 256 tokens
    assert metrics["kl"]["per_sequence"] > 0 and metrics["gold"]["count"] == 64
    assert max(large.values()) < 2.5 * max(small.values()), (small, large)
    assert large["evaluate"] < 2 * small["evaluate"], (small, large)
