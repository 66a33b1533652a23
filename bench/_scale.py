"""What bench/memory.py and bench/rehearsal.py share: projects around chat models of a real shape built locally
(tests/chat_models.py: answering_policy, a Qwen2-layout policy of any width and vocabulary that answers like a
trained one; a GPT-NeoX gold RM with its own tokenizer), and each step run in a process of its own (as `rlhf run`
runs it) with its seconds, peak memory and the bytes it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import BIN, ROOT, deep_update, fresh_project

from rlhf.core.io import disk_bytes
from tests import chat_models

QWEN2_05B = dict(  # Qwen2-0.5B's config: 24 layers, head dim 64
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
)

# A step as `rlhf <step>` runs it, in this process: its summary, seconds and peak resident memory on the last line.
STEP = """
import json, sys, time
from rlhf.orchestration.preload import quiet_libraries
quiet_libraries()
from rlhf.core.config import load_config
import importlib
step, rnd = sys.argv[1], sys.argv[2]
fn = getattr(importlib.import_module(f"tasks.{step}"), step)
cfg = load_config()
t = time.perf_counter()
fn(cfg) if step == "prepare" else fn(cfg, rnd)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_mb": peak / 1024}))
"""
# The peak is the process's own (VmHWM): its ru_maxrss would start at what its parent held when it forked, since
# Linux keeps the largest resident size across exec.


def gold_judge(dest: Path, hidden: int = 256, layers: int = 4) -> Path:
    """The gold RM: a GPT-NeoX sequence classifier with its own tokenizer and Zephyr-style template (not the
    policy's), random weights: a fixed, deterministic preference."""
    return chat_models.chat_judge(dest, chat_models.questions(ROOT)[:2000], hidden, layers)


def prompt_files(project: Path, counts: dict[str, int]) -> dict:
    """The shipped prompt sets cut to `counts` prompts each, as conversations; their params."""
    sets = {}
    for split, n in counts.items():
        rows = (ROOT / "data" / "prompts" / f"{split}.jsonl").read_text().splitlines()[:n]
        lines = [
            json.dumps({"id": r["id"], "prompt": [{"role": "user", "content": r["prompt"]}]})
            for r in map(json.loads, rows)
        ]
        (project / "data" / "prompts" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        sets[split] = f"data/prompts/{split}.jsonl"
    return sets


def project(dest: Path, policy: Path, judge: Path, params: dict, counts: dict[str, int]) -> Path:
    """A project at `dest` whose SFT policy is `policy` and gold judge `judge` (both copied in), with `params`."""
    fresh_project(dest, None, subset=False)
    shutil.copytree(policy, dest / "policy")
    shutil.copytree(judge, dest / "judge")
    base = {
        "prepare": {"policy": "policy"},
        "prompts": prompt_files(dest, counts),
        "label": {"judge": {"type": "hf", "name": "judge", "input": "chat"}, "unfinished": "keep"},
    }
    import yaml

    full = deep_update(deep_update(yaml.safe_load((dest / "params.yaml").read_text()), base), params)
    (dest / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    subprocess.run([BIN / "rlhf", "stages"], cwd=dest, check=True, capture_output=True)
    return dest


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def run_step(project: Path, step: str, rnd: str = "r01") -> dict:
    """One step in a process of its own: seconds (the step function alone), peak resident memory (MB) and the
    bytes it left under data/rounds."""
    before = written(project)
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", STEP, step, rnd], cwd=project, env=env(), capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"{project.name}: {step} {rnd} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result | {"process_seconds": time.perf_counter() - t, "wrote_mb": (written(project) - before) / 2**20}


def written(project: Path) -> int:
    return disk_bytes(p for p in (project / "data" / "rounds").rglob("*") if p.is_file())
