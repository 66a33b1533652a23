"""What the benchmarks share: a locally built project to measure on, interleaved timing, the printed table.

Nothing downloads: the projects are tests/conftest.py's `make_project` copies, whose models `prepare` builds.
Importing this module also takes conftest's isolation (PREFECT_HOME, DVC's site cache and HF offline under a
temporary folder), so a benchmark never touches ~/.prefect or the network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import deep_update, make_project  # noqa: E402  (sets the isolation env vars)

OUT = ROOT / "bench" / "out"
BIN = Path(sys.executable).parent
# The embedded default (params.yaml, every prompt), its round 0 trained for less time: prepare is not what
# is measured, and the full one takes 4-8 minutes on 2 cores. The rounds' params are the default's.
DEFAULT = {"prepare": {"tiny": {"pretrain_epochs": 0.25}, "sft_epochs": 1.0}}


def parser(doc: str, repeats: bool = True) -> argparse.ArgumentParser:
    """The command line every benchmark takes; `repeats` False for one that runs each side once."""
    p = argparse.ArgumentParser(
        description=doc.strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[-1],
    )
    if repeats:
        p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each side, interleaved (default 3)")
    p.add_argument(
        "--out", type=Path, default=OUT, help=f"folder for projects and results (default {OUT.relative_to(ROOT)})"
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads of both sides (default: runtime.threads of params.yaml); "
        "1 keeps the ratio steady on a machine other work shares, where 2 threads wait on each other",
    )
    return p


def overrides(args) -> dict:
    """The params the command line changes (given to `config`)."""
    return {"runtime": {"threads": args.threads}} if args.threads else {}


def quiet() -> None:
    """A step's log as the CLI has it: no library chatter or progress bars, warnings only."""
    import logging

    from rlhf.orchestration.preload import quiet_libraries

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    quiet_libraries()
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def config(change: dict | None = None):
    """The project's (the current folder's) config with `change` over its params.yaml, validated as usual."""
    from rlhf.core.config import parse_config, read_yaml

    return parse_config(deep_update(read_yaml("params.yaml"), change or {}), "params.yaml")


@contextmanager
def chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


def fresh_project(dest: Path, params: dict | None = None, subset: bool = True) -> Path:
    """A new project at `dest` (replacing one there) with `params` over the default params.yaml."""
    if dest.exists():
        shutil.rmtree(dest)
    return make_project(dest, params, subset)


def prepared(dest: Path, params: dict | None = None, subset: bool = True) -> Path:
    """A project whose round 0 (tokenizer, base, SFT policy) is built, in this process; kept between runs of a
    benchmark when its params.yaml is unchanged, since prepare is not what is measured."""
    import yaml

    want = yaml.safe_dump(
        deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), params or {}), sort_keys=False
    )
    if (dest / "data/rounds/r00/policy").is_dir() and (dest / "params.yaml").read_text() == want:
        return dest
    fresh_project(dest, params, subset)
    with chdir(dest):
        from tasks.prepare import prepare

        t = time.perf_counter()
        prepare(config())
        print(f"prepared {dest} in {time.perf_counter() - t:.0f} s", flush=True)
    return dest


def default_project(out: Path) -> Path:
    """The embedded default with its round 0 built (kept under `out` for the next benchmark)."""
    return prepared(out / "default", DEFAULT, subset=False)


def from_round0(out: Path, name: str, params: dict, subset: bool = True) -> Path:
    """A new project <out>/<name> with `params` over the embedded default, starting from the default
    project's round 0 (copied: the policy and model sizes are the default's, and nothing is built again)."""
    dest = fresh_project(out / name, {**DEFAULT, **params}, subset)
    shutil.copytree(default_project(out) / "data/rounds/r00", dest / "data/rounds/r00")
    return dest


def interleaved(sides: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each side, run in turns (A B, B A, A B, ...) after `warmup` untimed turns, so that load
    from other processes on a shared machine falls on every side alike."""
    names = list(sides)
    for _ in range(warmup):
        for n in names:
            sides[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            sides[n]()
            times[n].append(time.perf_counter() - t)
            print(f"  {n}: {times[n][-1]:.2f} s", flush=True)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def table(header: list[str], rows: list[list]) -> str:
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in [header, *rows]]
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, width))) for r in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def verdict(ratio: float, target: float, higher_is_better: bool) -> str:
    ok = ratio >= target if higher_is_better else ratio <= target
    return f"{ratio:.3f}x (target {'>=' if higher_is_better else '<='} {target}x: {'met' if ok else 'NOT met'})"


def report(name: str, out: Path, text: str, result: dict) -> None:
    """Print the result and keep it, with the machine it ran on, as <out>/<name>.json and .txt."""
    import torch

    machine = {
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    text += f"\nmachine: {machine['cpus']} CPU cores, load average {machine['load_avg'][0]:.2f} at the end"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.txt").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps({**result, "machine": machine}, indent=2) + "\n")
