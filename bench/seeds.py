"""Does each policy-update method work on many seeds, not on the one a test happens to use?

For each seed, the embedded default (params.yaml, every prompt) prepares its own round 0 with runtime.seed set
(the SFT policy differs per seed); each method then runs its three rounds from that round 0 with `dvc repro`,
as a user would. Per method it prints: on how many seeds gold rises beyond 3 standard errors from r00 to the
last round, how many end below r00, how many lose gold beyond 3 SE from one round to the next (the regression
alarm), how many have an update iteration whose rollout KL jumped over 4x (the KL-spike alarm, PPO), and the
median final gold with its range. Target (issue 28): every method raises gold on at least 9 of 10 seeds and
none ends below r00.

Resumable: a (method, seed) whose result is kept under <out>/seeds/ is not run again (delete it to rerun);
run it over several sittings with the same arguments and the table covers every result so far. PPO took
4 minutes a seed on 2 CPU cores, round 0 3 more per seed; the other methods are of the same order, so
`--seeds 10` for four methods is a few hours.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import time

from _common import BIN, ROOT, deep_update, fresh_project, parser, report, table

METHODS = ("ppo", "rest", "dpo", "rloo")


def main() -> None:
    ap = parser(__doc__, repeats=False)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    ap.add_argument("--seeds", default="10", help="a count N (seeds 0..N-1) or a comma-separated list (default 10)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a param over params.yaml for the rounds, e.g. update_policy.ppo.learning_rate=5e-5 (repeatable); "
        "its results are kept apart, under <out>/seeds/<the settings>/",
    )
    ap.add_argument("--only-table", action="store_true", help="print the table of the results kept; run nothing")
    args = ap.parse_args()
    seeds = list(range(int(args.seeds))) if args.seeds.isdigit() else [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    base = args.out / "seeds"
    results = base / ",".join(args.set) if args.set else base
    for seed in [] if args.only_table else seeds:
        for method in methods:
            if not (results / f"{method}-s{seed}.json").is_file():
                run(base, results, method, seed, args.threads, args.set)
    rows, result = summarise(results, methods, seeds)
    header = ["method", "seeds", "gold up > 3 SE", "below r00", "round lost > 3 SE", "KL spike", "final gold"]
    report("seeds", args.out, table(header, rows), {"set": args.set, **result})


def run(base, results, method: str, seed: int, threads: int | None, sets: list[str]) -> None:
    """One method's three rounds on the seed's round 0; its result kept as <results>/<method>-s<seed>.json."""
    import yaml

    from rlhf.studies.grid import with_key

    params = {"runtime": {"seed": seed, **({"threads": threads} if threads else {})}}
    r00 = base / f"r00-s{seed}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    if not (r00 / "dvc.lock").is_file():  # the seed's round 0, prepared once through DVC for every method
        fresh_project(r00, params, subset=False)
    current(r00, params, env)  # this checkout's code and params.yaml: DVC prepares again only where they changed
    repro(r00, env, "prepare")
    dest = results / f"{method}-s{seed}"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(r00, dest, symlinks=True)  # its dvc.lock and cache: DVC finds prepare done
    mine = deep_update(params, {"update_policy": {"method": method}})
    for key, _, value in (item.partition("=") for item in sets):
        mine = with_key(mine, key, yaml.safe_load(value), "--set")
    current(dest, mine, env)
    print(f"{method}, seed {seed}{' (' + ', '.join(sets) + ')' if sets else ''}: dvc repro in {dest}", flush=True)
    t = time.perf_counter()
    repro(dest, env)
    rounds = sorted(p.name for p in (dest / "data/rounds").iterdir() if (p / "metrics.json").is_file())
    metrics = {r: json.loads((dest / "data/rounds" / r / "metrics.json").read_text()) for r in rounds}
    out = {
        "method": method,
        "seed": seed,
        "set": sets,
        "seconds": round(time.perf_counter() - t),
        "gold": {r: [m["gold"]["mean"], m["gold"]["sem"]] for r, m in metrics.items()},
        "alarms": {r: m.get("alarms", []) for r, m in metrics.items()},
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{method}-s{seed}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"  {out['seconds']} s; gold " + " -> ".join(f"{g[0]:.3f}" for g in out["gold"].values()), flush=True)
    models = [dest / "data/rounds" / r / name for r in rounds for name in ("base", "policy", "reward_model")]
    for folder in [dest / ".dvc/cache", *models]:  # what the table needs is kept above (and metrics.json beside)
        shutil.rmtree(folder, ignore_errors=True)


def current(project, params: dict, env: dict) -> None:
    """The project's code and params.yaml made this checkout's (with `params` over it), its stages rewritten."""
    import yaml

    for name in ("rlhf", "tasks", "flows"):
        shutil.rmtree(project / name)
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    mine = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), params)
    (project / "params.yaml").write_text(yaml.safe_dump(mine, sort_keys=False))
    subprocess.run([BIN / "rlhf", "stages"], cwd=project, env=env, check=True, capture_output=True)


def repro(project, env: dict, *targets: str) -> None:
    done = subprocess.run([BIN / "dvc", "repro", *targets], cwd=project, env=env, capture_output=True, text=True)
    (project / "repro.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"dvc repro failed in {project} (its repro.log says why)")


def summarise(base, methods: list[str], seeds: list[int]) -> tuple[list[list], dict]:
    """Per method, over the seeds with a result: the counts the target is stated in and the final gold."""
    rows, result = [], {}
    for method in methods:
        found = [json.loads(p.read_text()) for s in seeds if (p := base / f"{method}-s{s}.json").is_file()]
        if not found:
            continue
        rises = below = lost = spikes = 0
        finals = []
        for r in found:
            gold = [r["gold"][k] for k in sorted(r["gold"])]
            (g0, s0), (gn, sn) = gold[0], gold[-1]
            rises += gn - g0 > 3 * math.hypot(s0, sn)
            below += gn < g0
            lost += any(b[0] < a[0] - 3 * math.hypot(a[1], b[1]) for a, b in zip(gold, gold[1:]))
            spikes += any(a.startswith("KL spike") for alarms in r["alarms"].values() for a in alarms)
            finals.append(gn)
        n = len(found)
        final = f"{statistics.median(finals):.3f} [{min(finals):.3f}, {max(finals):.3f}]"
        rows.append([method, n, f"{rises}/{n}", f"{below}/{n}", f"{lost}/{n}", f"{spikes}/{n}", final])
        result[method] = {
            "seeds": [r["seed"] for r in found],
            "rises": rises,
            "below_r00": below,
            "round_lost": lost,
            "kl_spikes": spikes,
            "final_gold": finals,
        }
    return rows, result


if __name__ == "__main__":
    main()
