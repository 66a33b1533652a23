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
from rlhf.lifetime import die_with_parent

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
    study = sub.add_parser("study", help="run a grid of configurations x seeds side by side and compare them",
                           description="A study file (studies/<name>.yaml) names a base params file, axes of values "
                           "to vary, seeds and rounds; each configuration x seed runs in its own DVC workspace under "
                           "studies/<name>/.")
    actions = study.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("run", "validate the grid, then run every run not yet done (at most `parallel` at once) "
                                 "through a Prefect flow; ends with the report"),
                         ("status", "print each run's state: done, running, failed (with its message), not started"),
                         ("report", "write studies/<name>/report/: the final round per configuration ranked by "
                                    "gold, and gold against √KL per configuration (offline)")):
        actions.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".").add_argument(
            "study", metavar="STUDY", help="a study file, e.g. studies/wolf-mini.yaml")
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


def _dispatch(args) -> int:
    from rlhf.config import check_inputs, load_config

    if args.command == "study":
        return _study(args)
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
        return _run(args)
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


def _run(args) -> int:
    """The flow, against PREFECT_API_URL or else a temporary server that lives (and dies) with this run."""
    from rlhf.lifetime import prefect_api

    with prefect_api():
        from flows.iterate import iterate

        iterate(force=args.force)
    return 0


def _study(args) -> int:
    from rlhf import study

    s = study.load_study(args.study)  # the whole grid is validated before anything runs or is created
    if args.action == "status":
        print(study.status_table(s))
        return 0
    if args.action == "report":
        print(f"{study.markdown_table(study.final_rows(s), study.axis_names(s))}\nreport: {study.write_report(s)}")
        return 0
    study.check_study(s)
    from rlhf.lifetime import prefect_api

    with prefect_api():  # the study's runs report to the same server
        from flows.study import study as study_flow

        study_flow(args.study)
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
