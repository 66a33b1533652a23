"""Cost growth: each round's seconds for rounds 1-6 with `train_rm.data: concat` (the RM trains on every
round's pairs so far) against `sample` (a fixed number of pairs, an equal share from each round).

Two projects start from the embedded default's round 0 (its model sizes and params, on the tests' subset of
prompts, generate.k 4, so that twelve rounds fit in minutes) and differ only in train_rm.data; sample_size is
about one round's pairs, so a `sample` round costs what round 1 does. Their rounds run in turns (concat r01, sample
r01, concat r02, ...) with the step functions called in this process, so load from elsewhere falls on both.
Expected: concat's train_rm grows with the round number, sample's stays flat; the other steps are alike.
Takes about 6 minutes on 2 CPU cores (the first run also builds the embedded default's round 0).
"""

from __future__ import annotations

import importlib
import time

from _common import chdir, config, from_round0, overrides, parser, quiet, report, table

ROUNDS = [f"r{i:02d}" for i in range(1, 7)]
STEPS = ("generate", "label", "train_rm", "update_policy", "evaluate")
PAIRS = 180  # about one round's pairs (best vs worst of each of the 200 label prompts, less the ties)


def main() -> None:
    p = parser(__doc__, repeats=False)
    p.add_argument("--rounds", type=int, default=6, help="rounds per variant (default 6)")
    args = p.parse_args()
    quiet()
    rounds = ROUNDS[: args.rounds]
    chain = {r: (ROUNDS[i - 1] if i else "r00") for i, r in enumerate(rounds)}
    base = {"rounds": chain, "generate": {"k": 4}, "train_rm": {"sample_size": PAIRS}}
    projects = {
        data: from_round0(args.out, f"cost_growth/{data}", {**base, "train_rm": {**base["train_rm"], "data": data}})
        for data in ("concat", "sample")
    }
    took = {data: {r: {} for r in rounds} for data in projects}
    pairs = {data: {} for data in projects}
    for rnd in rounds:
        for data, project in projects.items():
            with chdir(project):
                cfg = config(overrides(args))
                for step in STEPS:
                    t = time.perf_counter()
                    out = getattr(importlib.import_module(f"tasks.{step}"), step)(cfg, rnd)
                    took[data][rnd][step] = time.perf_counter() - t
                    if step == "train_rm":
                        pairs[data][rnd] = out["pairs"]
            print(
                f"  {data} {rnd}: {sum(took[data][rnd].values()):.1f} s, RM trained on {pairs[data][rnd]} pairs",
                flush=True,
            )
    rows = [
        [r, *(x for d in projects for x in (pairs[d][r], took[d][r]["train_rm"], sum(took[d][r].values())))]
        for r in rounds
    ]
    growth = {d: sum(took[d][rounds[-1]].values()) / sum(took[d][rounds[0]].values()) for d in projects}
    rm_growth = {d: took[d][rounds[-1]]["train_rm"] / took[d][rounds[0]]["train_rm"] for d in projects}
    text = (
        f"cost growth: rounds {rounds[0]}-{rounds[-1]}, train_rm.data concat against sample "
        f"(sample_size {PAIRS}); seconds per round\n"
        + table(
            ["round", "concat: RM pairs", "train_rm s", "round s", "sample: RM pairs", "train_rm s", "round s"], rows
        )
        + "".join(
            f"\n{d}: {rounds[-1]} / {rounds[0]} round time {growth[d]:.2f}x (train_rm {rm_growth[d]:.2f}x)"
            for d in projects
        )
        + f"\nconcat / sample, {rounds[-1]}'s round time: "
        f"{sum(took['concat'][rounds[-1]].values()) / sum(took['sample'][rounds[-1]].values()):.2f}x"
    )
    report(
        "cost_growth",
        args.out,
        text,
        {"seconds": took, "pairs": pairs, "round_growth": growth, "train_rm_growth": rm_growth},
    )


if __name__ == "__main__":
    main()
