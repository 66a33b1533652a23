"""Peak memory against the vocabulary: evaluate, and the policy update of each method, at vocabularies of 512,
32,000, 151,936 (Qwen2) and 256,000 (Gemma) rows x answers of up to 48, 256 and 1,024 tokens.

Each cell is one round of a project whose SFT policy is a Qwen2-layout chat model of tiny width (hidden 64,
2 layers, tied embeddings) with that many vocabulary rows (tests/chat_models.py's answering_policy: random
weights, answering in its tokenizer's tokens, about half its answers running to max_new_tokens), its gold judge
a GPT-NeoX RM with its own tokenizer. The updates train a LoRA adapter of rank 16, as at scale (full weights
would add the optimizer's copies of every vocabulary row: the model's size, not a temporary); PPO's value model
trains all of its weights. 8 prompts in each set, batches of 8 in training, at most 32 answers sampled at once;
the landscape grid and the conversation checks are off (more of the same sampling). Each step runs in a process
of its own, as `rlhf run` runs it, and the table gives its peak resident memory (the process's own high-water
mark). Target: for evaluate and each method's update, at every answer length, a peak no more than 1.5x that at
the smallest vocabulary (the models' own vocabulary rows included: 39 MB a copy at 151,936 x 64).
Takes about 90 minutes on 2 CPU cores for the whole grid (--vocab and --lengths take a part of it).
"""

from __future__ import annotations

import yaml
from _common import parser, report, table, verdict
from _scale import gold_judge, project, run_step

from tests.chat_models import answering_policy

TARGET = 1.5
VOCABS = (512, 32_000, 151_936, 256_000)
LENGTHS = (48, 256, 1024)
METHODS = ("ppo", "rest", "rloo", "dpo")  # dpo last: evaluate scores its policy
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
COUNTS = {"label": 8, "policy": 8, "eval": 8}  # each sampling a batch of 16 or 32 answers


def params(length: int) -> dict:
    return {
        "rounds": {"r01": "r00"},
        "generate": {"k": 2, "max_new_tokens": length},
        "train_rm": {"epochs": 1.0, "max_length": 2 * length + 128},
        "update_policy": {
            "k": 4,
            "batch_size": 8,
            "max_length": 2 * length + 128,
            "unfinished": "keep",
            "rest": {"thresholds": [0.0]},
            "lora": {"rank": 16, "alpha": 32},
            "ppo": {"ppo_epochs": 1},
            "dpo": {"epochs": 1.0},
        },
        "evaluate": {"max_new_tokens": length, "landscape": {"axes": {}}, "conversation_checks": None},
    }


def main() -> None:
    p = parser(__doc__, repeats=False)
    p.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS), help="vocabulary sizes (default: all)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="max new tokens (default: all)")
    args = p.parse_args()
    base = args.out / "memory"
    judge = base / "judge"
    if not judge.is_dir():
        gold_judge(judge)
    peaks: dict[tuple[int, int], dict[str, float]] = {}
    for length in args.lengths:
        for vocab in args.vocab:
            policy = base / "policies" / f"v{vocab}-l{length}"
            if not policy.is_dir():
                answering_policy(policy, vocab, SHAPE, length)
            peaks[vocab, length] = cell(base / f"v{vocab}-l{length}", policy, judge, length)
            print(f"vocabulary {vocab}, {length} tokens: {peaks[vocab, length]}", flush=True)
    steps = list(next(iter(peaks.values())))
    rows, ratios = [], {}
    for length in args.lengths:
        smallest = peaks[min(args.vocab), length]
        for vocab in args.vocab:
            rows.append([f"{vocab}", length, *(round(peaks[vocab, length][s]) for s in steps)])
        largest = peaks[max(args.vocab), length]
        ratios[length] = {s: largest[s] / smallest[s] for s in steps}
        rows.append([f"  {max(args.vocab)} / {min(args.vocab)}", length, *(f"{ratios[length][s]:.2f}x" for s in steps)])
    worst = max((r for by_step in ratios.values() for s, r in by_step.items() if s.startswith(("update", "evaluate"))))
    text = (
        "peak resident memory (MB) of each step's process, a Qwen2-layout policy of hidden size 64\n"
        + table(["vocabulary", "tokens", *steps], rows)
        + f"\nlargest over smallest vocabulary, evaluate and updates, worst: {verdict(worst, TARGET, False)}"
    )
    report("memory", args.out, text, {"peaks_mb": {f"{v}x{n}": p for (v, n), p in peaks.items()}, "ratios": ratios})


def cell(dest, policy, judge, length: int) -> dict[str, float]:
    """One round: each step's peak (MB), the update once per method."""
    proj = project(dest, policy, judge, params(length), COUNTS)
    out = {}
    for step in ("prepare", "generate", "label", "train_rm"):
        out[step] = run_step(proj, step)["peak_mb"]
    for method in METHODS:
        spec = yaml.safe_load((proj / "params.yaml").read_text())
        spec["update_policy"]["method"] = method
        (proj / "params.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        out[f"update {method}"] = run_step(proj, "update_policy")["peak_mb"]
    out["evaluate"] = run_step(proj, "evaluate")["peak_mb"]
    return out


if __name__ == "__main__":
    main()
