"""`rlhf`: the command line. Each step subcommand is the DVC stage command of that step."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from rlhf import ROUND_STEPS, STEPS
from rlhf.errors import UserError

PARAMS = "params.yaml"


def _step_doc(step: str) -> str:
    """The first line of tasks/<step>.py's docstring, read without importing it (fast --help)."""
    from pathlib import Path

    import tasks

    src = (Path(tasks.__file__).parent / f"{step}.py").read_text()
    first = src.split('"""')[1].strip().split("\n\n")[0].replace("\n", " ")
    return first.split(": ", 1)[1]  # drop the "<step>: " the docstring starts with


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf", description="Iterated RLHF: Prefect runs the rounds, DVC versions them.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run every round of params.yaml through Prefect and DVC (the main job)",
                         description="Validate params.yaml, then run prepare and each round's steps as DVC stages "
                         "in a Prefect flow; up-to-date stages are skipped. Ends with the per-round metrics table.")
    run.add_argument("--force", action="store_true", help="re-run every stage even if DVC finds it up to date")
    sub.add_parser("check", help="validate params.yaml and the files it names, run nothing")
    sub.add_parser("metrics", help="print the per-round metrics table of the rounds run so far")
    rep = sub.add_parser("report", help="write an offline HTML report (plots, alarms, sample responses) of the rounds so far",
                         description="Write report.html (plots embedded, opens offline), the plots as PNG and "
                         "rounds.csv (which `dvc plots show` reads) for the rounds run so far.")
    rep.add_argument("--out", default="reports", help="folder to write into (default: reports)")
    for step in STEPS:
        sp = sub.add_parser(step, help=_step_doc(step), description=_step_doc(step) + " (the DVC stage command)")
        if step in ROUND_STEPS:
            sp.add_argument("round", help="round name, e.g. r01 (a key of `rounds` in params.yaml)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.command in STEPS:
        die_with_parent()
    if args.command in STEPS and os.environ.get("PYTHONHASHSEED") != "0":
        # Fixed hash seed: libraries that write sets (e.g. PEFT's target_modules) then write them alike.
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "rlhf", *argv])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("rlhf").setLevel(logging.INFO)
    try:
        sys.exit(_dispatch(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a file or device the user can act on: one line, not a traceback
        print(f"error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def die_with_parent() -> None:
    """A step dies with the process that started it (DVC, or the flow): when a preempted or killed run
    loses its orchestrator, no orphaned step goes on writing into the round behind the next run's back.
    Linux only (prctl PR_SET_PDEATHSIG, which survives the exec below); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        sys.exit(137)


def _dispatch(args) -> int:
    from rlhf.config import check_inputs, load_config

    cfg = load_config(PARAMS)
    if args.command in ("check", "run"):
        check_inputs(cfg)
    if args.command == "check":
        print(f"{PARAMS}: ok ({len(cfg.rounds)} rounds)")
        return 0
    if args.command == "metrics":
        from rlhf.report import metrics_rows, metrics_table

        print(metrics_table(metrics_rows(["r00", *cfg.rounds])))
        return 0
    if args.command == "report":
        from rlhf.report import write_report

        print(write_report(["r00", *cfg.rounds], args.out))
        return 0
    if args.command == "run":
        from flows.iterate import iterate

        try:
            iterate(force=args.force)
        finally:  # send the run's last logs, then stop a temporary Prefect server before the error is printed
            from prefect.logging.handlers import APILogWorker
            from prefect.server.api.server import SubprocessASGIServer

            APILogWorker.drain_all(timeout=5)
            SubprocessASGIServer().stop()
        return 0
    rnd = getattr(args, "round", "r00")
    if args.command != "prepare" and rnd not in cfg.rounds:
        raise UserError(f"{PARAMS}: rounds: no round {rnd!r} (have {', '.join(cfg.rounds)})")
    _quiet_libraries()
    from rlhf.io import remove_scratch
    from rlhf.paths import round_paths

    remove_scratch(round_paths(rnd).root)  # what a killed earlier attempt left half-written
    fn = getattr(importlib.import_module(f"tasks.{args.command}"), args.command)
    summary = fn(cfg) if args.command == "prepare" else fn(cfg, rnd)
    print(json.dumps(summary, sort_keys=True))
    return 0


def _quiet_libraries() -> None:
    """Keep a step's log readable: no library chatter, and no progress bars when nobody watches a terminal."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


if __name__ == "__main__":
    main()
