"""A real-shape rehearsal: one round of DPO and one of RLOO with a policy of Qwen2-0.5B's shape, on this machine.

The policy has Qwen2-0.5B's layout and size: 24 layers, hidden 896, 14 attention heads over 2 key-value heads,
MLP 4,864, a 151,936-row vocabulary tied to its embedding, ChatML: 494M parameters, float32 on a CPU. Its
weights are random, shaped to answer in its tokenizer's tokens (tests/chat_models.py's answering_policy); at this
depth it almost never ends a turn, so nearly every answer runs to the 256 new tokens. The update trains a LoRA
adapter of rank 16 on every linear layer; the proxy RM (from the policy: 494M parameters) trains all its weights;
training recomputes activations (runtime.activation_checkpointing); the gold judge is a GPT-NeoX RM with its own
tokenizer and template; prompts are conversations. Sized for 2 CPU cores: 8 prompts in each set, 2 answers per
prompt, one epoch; the landscape, the conversation checks and the held-out NLL are off. RLOO rather than PPO by
default: PPO's value model is a second 494M model trained with AdamW, in the eval mode that keeps every activation
(its own loop; no recomputation), which with 8 rollouts a minibatch needs more than this machine's 24 GB
(`--methods dpo ppo` runs it where memory allows).

For each method round 0 is made once (prepare, measured on its own); then round 1 runs twice from it, each side
a fresh command timed whole, imports included:
  direct     the five step functions called one after another in one Python process;
  rlhf run   the Prefect flow against a running `rlhf server`, each step its DVC stage in a process of its own.
The table gives each step's seconds on both sides, and from the flow's own log (each step's last line) its peak
memory (the process's resident high-water mark) and the bytes it wrote. Target: rlhf run takes at most 1.05x
the direct side, and no process needs more than the machine's memory.
Takes about 60 minutes on 2 CPU cores (the first run also builds the models, a few minutes more).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
from _common import BIN, parser, report, table, verdict
from _scale import QWEN2_05B, env, gold_judge, project, run_step
from orchestration import DIRECT_CODE, STEPS, _server

from tests.chat_models import answering_policy

TARGET = 1.05
VOCAB, TOKENS = 151_936, 256
COUNTS = {"label": 8, "policy": 8, "eval": 8}
PARAMS = {
    "runtime": {"activation_checkpointing": True},
    "rounds": {"r01": "r00"},
    "generate": {"k": 2, "max_new_tokens": TOKENS, "batch_size": 16},
    "train_rm": {"epochs": 1.0, "batch_size": 8, "max_length": 2 * TOKENS + 128},
    "update_policy": {
        "k": 2,
        "batch_size": 8,
        "max_length": 2 * TOKENS + 128,
        "lora": {"rank": 16, "alpha": 32},
        "dpo": {"epochs": 1.0},
        "ppo": {"ppo_epochs": 1},
    },
    "evaluate": {
        "samples_per_prompt": 2,
        "max_new_tokens": TOKENS,
        "batch_size": 16,
        "landscape": {"axes": {}},
        "conversation_checks": None,
        "heldout": None,
    },
}
COST = re.compile(r"(\w+) r01: ([\d,.]+) s, peak memory ([\d,]+) MiB.*?, wrote ([\d,.]+) MiB")


def main() -> None:
    p = parser(__doc__, repeats=False)
    p.add_argument("--methods", nargs="+", default=["dpo", "rloo"], help="update_policy.method of each round")
    args = p.parse_args()
    base = args.out / "rehearsal"
    models = base / "models"
    t = time.perf_counter()
    if not (models / "policy").is_dir():
        answering_policy(models / "policy", VOCAB, QWEN2_05B, TOKENS)
    if not (models / "judge").is_dir():
        gold_judge(models / "judge")
    print(f"the models: {time.perf_counter() - t:.0f} s to build (0: built before)", flush=True)
    results = {}
    with _server(base / "server") as api_url:
        for method in args.methods:
            results[method] = rehearse(base / method, models, method, api_url)
    text = "\n\n".join(describe(m, r) for m, r in results.items())
    worst = max(r["ratio"] for r in results.values())
    peak = max(max(s["peak_mib"] for s in r["flow"].values()) for r in results.values())
    total = psutil.virtual_memory().total / 2**20
    text += (
        f"\n\nlargest process: {peak:,.0f} MiB of the machine's {total:,.0f} MiB"
        f"\nrlhf run / direct, worst of {', '.join(results)}: {verdict(worst, TARGET, higher_is_better=False)}"
    )
    report("rehearsal", args.out, text, {"methods": results, "target": TARGET, "machine_mib": total})


def rehearse(where: Path, models: Path, method: str, api_url: str) -> dict:
    """Round 0 once, then round 1 directly and through `rlhf run`; seconds, peaks and bytes of each."""
    params = {**PARAMS, "update_policy": {**PARAMS["update_policy"], "method": method}}
    template = where / "template"
    if not (template / "dvc.lock").is_file():
        project(template, models / "policy", models / "judge", params, COUNTS)
        prepare = run_step(template, "prepare")
        subprocess.run([BIN / "dvc", "commit", "--force", "--quiet", "prepare"], cwd=template, check=True)
        (template / "prepare.json").write_text(json.dumps(prepare))
    prepare = json.loads((template / "prepare.json").read_text())
    out = {"prepare": prepare}
    for side in ("direct", "rlhf run"):
        work = where / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(template, work, symlinks=True)
        cmd = [sys.executable, "-c", DIRECT_CODE] if side == "direct" else [str(BIN / "rlhf"), "run"]
        t = time.perf_counter()
        run = subprocess.run(cmd, cwd=work, env={**env(), "PREFECT_API_URL": api_url}, capture_output=True, text=True)
        out[f"{side} seconds"] = time.perf_counter() - t
        if run.returncode:
            raise SystemExit(f"{method}: {side} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        print(f"  {method}, {side}: {out[f'{side} seconds']:.0f} s", flush=True)
        if side == "direct":
            out["direct"] = json.loads(run.stdout.strip().splitlines()[-1])
        else:
            costs = {m[1]: m for m in COST.finditer(run.stdout + run.stderr)}
            out["flow"] = {
                step: {
                    "seconds": _number(costs[step][2]),
                    "peak_mib": _number(costs[step][3]),
                    "wrote_mib": _number(costs[step][4]),
                }
                for step in STEPS
            }
            out["log"] = (run.stdout + run.stderr)[-4000:]
    out["ratio"] = out["rlhf run seconds"] / out["direct seconds"]
    return out


def describe(method: str, r: dict) -> str:
    rows = [
        ["prepare (round 0, once)", None, r["prepare"]["seconds"], r["prepare"]["peak_mb"], r["prepare"]["wrote_mb"]]
    ]
    rows += [
        [step, r["direct"][step], r["flow"][step]["seconds"], r["flow"][step]["peak_mib"], r["flow"][step]["wrote_mib"]]
        for step in STEPS
    ]
    rows.append(["whole command", r["direct seconds"], r["rlhf run seconds"], None, None])
    return (
        f"{method}: one round of a Qwen2-0.5B-shaped policy (LoRA 16), {TOKENS} new tokens\n"
        + table(
            ["step", "direct s", "rlhf run s", "peak MiB", "wrote MiB"],
            [[c if c is not None else "" for c in row] for row in rows],
        )
        + f"\nrlhf run / direct: {r['ratio']:.3f}x"
    )


def _number(text: str) -> float:
    return float(text.replace(",", ""))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
