"""Runs side by side: two steps at once on the same cores, their OpenMP threads spinning while they wait (the
libraries' default) or sleeping (OMP_WAIT_POLICY=PASSIVE, which `rlhf study run` sets when `parallel` > 1).

Each side runs `rlhf generate r01` as its own process in two copies of the embedded default's project at
once, as a study with `parallel: 2` runs two seeds, or the two one after the other, which is what running
them side by side has to beat. The samples are checked identical on every side: the wait policy changes how
threads wait, not what they compute. Target: the sleeping pair at once is no slower than the two one after
the other (ratio >= 1); spinning / sleeping shows what OMP_WAIT_POLICY=PASSIVE saves when runs share cores.
Takes about 12 minutes on 2 CPU cores, most of it the spinning pair (the first run also builds round 0).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from _common import BIN, from_round0, parser, report, table, verdict

TARGET = 1.0
SAMPLES = "data/rounds/r01/samples.jsonl"


def main() -> None:
    args = parser(__doc__, repeats=False).parse_args()
    base = args.out / "parallel_runs"
    first = from_round0(base, "a", {"runtime": {"threads": args.threads}} if args.threads else {})
    second = base / "b"
    shutil.rmtree(second, ignore_errors=True)
    shutil.copytree(first, second)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "RLHF_PRELOAD")}

    def steps(folders, policy: dict) -> tuple[float, set[bytes]]:
        """Wall seconds of `rlhf generate r01` in each folder at once, and the distinct samples they wrote."""
        for f in folders:
            (f / SAMPLES).unlink(missing_ok=True)
        t = time.perf_counter()
        procs = [
            subprocess.Popen(
                [BIN / "rlhf", "generate", "r01"],
                cwd=f,
                env={**env, **policy},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for f in folders
        ]
        for p in procs:
            _, err = p.communicate()
            if p.returncode:
                raise SystemExit(f"rlhf generate r01 failed: {err.decode()[-2000:]}")
        took = time.perf_counter() - t
        print(f"  {len(folders)} at once, {policy or 'default'}: {took:.1f} s", flush=True)
        return took, {(f / SAMPLES).read_bytes() for f in folders}

    passive = {"OMP_WAIT_POLICY": "PASSIVE"}
    sides = {
        "one alone (default)": ([first], {}),
        "two at once, spinning (default)": ([first, second], {}),
        "two at once, sleeping (PASSIVE)": ([first, second], passive),
    }
    results = {name: steps(*side) for name, side in sides.items()}
    after = [steps([folder], {}) for folder in (first, second)]  # the same two runs, one after the other
    results["two one after the other (default)"] = (sum(t for t, _ in after), set().union(*(s for _, s in after)))
    same = len(set().union(*(s for _, s in results.values()))) == 1
    took = {name: t for name, (t, _) in results.items()}
    ratio = took["two one after the other (default)"] / took["two at once, sleeping (PASSIVE)"]
    spin = took["two at once, spinning (default)"] / took["two at once, sleeping (PASSIVE)"]
    text = (
        "parallel runs: `rlhf generate r01` of the embedded default (each step its own process), "
        f"identical samples on every side: {same}\n"
        + table(["side", "wall s"], [[k, v] for k, v in took.items()])
        + f"\nspinning / sleeping, two at once: {spin:.2f}x"
        + f"\none after the other / sleeping pair at once: {verdict(ratio, TARGET, higher_is_better=True)}"
    )
    summary = {"seconds": took, "same_samples": same, "ratio": ratio, "spinning_ratio": spin, "target": TARGET}
    report("parallel_runs", args.out, text, summary)


if __name__ == "__main__":
    main()
