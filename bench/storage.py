"""Storage: what each round keeps on disk with a LoRA adapter per round against full policy weights.

Two projects start from the embedded default's round 0 (its model sizes and params, on the tests' subset of
prompts, generate.k 4) and differ only in update_policy.lora.rank (0: every weight trained and saved; 8: an
adapter over the SFT policy). Rounds 1-2 run in turns with the step functions called in this process; the
table gives each round's policy folder and whole round folder (what DVC caches and `dvc push` uploads for
it), and the update step's seconds. Expected: the adapter is a small fraction of the full weights.
Takes about 3 minutes on 2 CPU cores (the first run also builds the embedded default's round 0).
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from _common import chdir, config, from_round0, overrides, parser, quiet, report, table

ROUNDS = ("r01", "r02")
STEPS = ("generate", "label", "train_rm", "update_policy", "evaluate")
VARIANTS = {"full weights": 0, "LoRA rank 8": 8}


def main() -> None:
    args = parser(__doc__, repeats=False).parse_args()
    quiet()
    base = {"rounds": {"r01": "r00", "r02": "r01"}, "generate": {"k": 4}}
    projects = {
        v: from_round0(args.out, f"storage/rank{rank}", {**base, "update_policy": {"lora": {"rank": rank}}})
        for v, rank in VARIANTS.items()
    }
    sizes: dict[str, dict[str, dict[str, int]]] = {v: {} for v in projects}
    update_s: dict[str, dict[str, float]] = {v: {} for v in projects}
    for rnd in ROUNDS:
        for v, project in projects.items():
            with chdir(project):
                from rlhf.core.paths import round_paths

                cfg = config(overrides(args))
                for step in STEPS:
                    t = time.perf_counter()
                    getattr(importlib.import_module(f"tasks.{step}"), step)(cfg, rnd)
                    if step == "update_policy":
                        update_s[v][rnd] = time.perf_counter() - t
                paths = round_paths(rnd)
                sizes[v][rnd] = {"policy": _bytes(paths.policy), "round": _bytes(paths.root)}
            print(f"  {v} {rnd}: policy {sizes[v][rnd]['policy'] / 2**20:.2f} MiB", flush=True)
    full, lora = projects
    rows = [
        [f"{v} {r}", sizes[v][r]["policy"] / 2**20, sizes[v][r]["round"] / 2**20, update_s[v][r]]
        for r in ROUNDS
        for v in projects
    ]
    ratio = {r: sizes[lora][r]["policy"] / sizes[full][r]["policy"] for r in ROUNDS}
    round_ratio = {r: sizes[lora][r]["round"] / sizes[full][r]["round"] for r in ROUNDS}
    text = (
        "storage: each round's folder with a LoRA adapter against full policy weights (MiB)\n"
        + table(["variant, round", "policy MiB", "round MiB", "update_policy s"], rows)
        + "".join(f"\n{r}: LoRA / full, policy {ratio[r]:.4f}x, whole round {round_ratio[r]:.3f}x" for r in ROUNDS)
        + "\n(a round's folder also holds its proxy RM, samples and labels, which LoRA does not change)"
    )
    report(
        "storage",
        args.out,
        text,
        {"bytes": sizes, "update_policy_s": update_s, "policy_ratio": ratio, "round_ratio": round_ratio},
    )


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


if __name__ == "__main__":
    main()
