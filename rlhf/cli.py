"""`rlhf`: the command line. Each step subcommand is the DVC stage command of that step."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time

from rlhf.core.errors import UserError
from rlhf.core.paths import ROUND_STEPS, STEPS
from rlhf.core.processes import die_with_parent, die_with_run

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
    run = sub.add_parser(
        "run",
        help="run every round of params.yaml through Prefect and DVC (the main job)",
        description="Validate params.yaml, then run prepare and each round's steps as DVC stages "
        "in a Prefect flow; up-to-date stages are skipped. Ends with the per-round metrics table.",
    )
    run.add_argument("--force", action="store_true", help="re-run every stage even if DVC finds it up to date")
    run.add_argument(
        "--more",
        type=int,
        default=0,
        metavar="N",
        help="run N rounds past the last completed one, adding them to `rounds` in params.yaml",
    )
    _schedule_args(
        sub.add_parser(
            "serve",
            help="serve the iteration as a Prefect deployment on a schedule (each run adds rounds)",
            description="Register the iteration flow as deployment iterated-rlhf/NAME with a cron or interval "
            "schedule and start its due runs (one at a time) until Ctrl-C. Each run continues from the last "
            "completed round by --more rounds, adding them to params.yaml. Needs a Prefect server that stays up: "
            "`rlhf server` in this project, or PREFECT_API_URL.",
        ),
        "iterate",
    )
    server = sub.add_parser(
        "server",
        help="start the Prefect server and dashboard for this project",
        description="Start the Prefect server (API and UI) in the foreground, its state under "
        ".prefect/; `rlhf run`, `rlhf serve` and `rlhf study run` here report to it.",
    )
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=4200, help="port (default 4200)")
    remote = sub.add_parser(
        "remote",
        help="make an S3 bucket the project's DVC remote (then `dvc push`/`dvc pull`)",
        description="Make s3://bucket/prefix the project's default DVC remote (`dvc remote add "
        "-d`), after checking that the bucket answers. Only the URL and endpoint go into "
        ".dvc/config; credentials come from the environment or boto3's chain (AWS_ACCESS_KEY_ID, "
        "AWS_PROFILE, ...).",
    )
    remote.add_argument("url", metavar="S3_URL", help="s3://bucket/prefix")
    remote.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="an S3-compatible endpoint (MinIO, Ceph, ...); default: AWS, or AWS_ENDPOINT_URL",
    )
    remote.add_argument("--name", default="s3", help="the DVC remote's name (default: s3)")
    remote.add_argument("--no-check", action="store_true", help="configure it without checking the bucket")
    publish = sub.add_parser(
        "publish",
        help="upload a round's policy, reward model, metrics and report to S3",
        description="Upload round ROUND's policy, reward model, metrics.json, eval_samples.jsonl, "
        "landscape.json and reports/ to S3_URL/ROUND/ with SHA-256 checksums, large files in "
        "parts; files already there with the same sha256 are skipped.",
    )
    publish.add_argument("dest", metavar="S3_URL", help="s3://bucket/prefix")
    publish.add_argument("--round", required=True, help="the round to publish, e.g. r03")
    publish.add_argument(
        "--endpoint-url", metavar="URL", help="an S3-compatible endpoint; default: AWS, or AWS_ENDPOINT_URL"
    )
    sub.add_parser("check", help="validate params.yaml and the files it names, run nothing")
    ref = sub.add_parser(
        "params",
        help="describe params.yaml's keys (all, or one)",
        description="Print each key of params.yaml with the values it takes, its default and what it "
        "does, from the one schema (rlhf/core/config.py); docs/params.md is this with --markdown.",
    )
    ref.add_argument("key", nargs="?", metavar="KEY", help="a dotted key, e.g. train_rm.data, or a section")
    ref.add_argument("--markdown", action="store_true", help="the whole reference as Markdown (docs/params.md)")
    sub.add_parser(
        "stages",
        help="write dvc.yaml from params.yaml and the code (before `dvc repro` by hand)",
        description="Write dvc.yaml: each step's DVC stage with the project files its step imports and "
        "the round outputs it reads under these params. `rlhf run` does it itself; run this after "
        "editing params.yaml when you use `dvc repro` or `dvc status` directly.",
    )
    sub.add_parser(
        "verify",
        help="hash every output dvc.lock records again, from its bytes, and list what differs",
        description="Read every output of every stage that dvc.lock records and hash it as DVC does (files: md5 "
        "of the content; folders: DVC's .dir manifest), bypassing DVC's cache of hashes, which trusts a file whose "
        "size and modification time are unchanged. Lists each path that differs with the stage that wrote it; "
        "exit status 1 if any does, 0 if all match.",
    )
    sub.add_parser("metrics", help="print the per-round metrics table of the rounds run so far")
    rep = sub.add_parser(
        "report",
        help="write an offline HTML report (plots, alarms, sample responses) of the rounds so far",
        description="Write report.html (plots embedded, opens offline), the plots as PNG and "
        "rounds.csv (which `dvc plots show` reads) for the rounds run so far.",
    )
    rep.add_argument("--out", default="reports", help="folder to write into (default: reports)")
    study = sub.add_parser(
        "study",
        help="run a grid of configurations x seeds side by side and compare them",
        description="A study file (studies/<name>.yaml) names a base params file, axes of values "
        "to vary, seeds and rounds; each configuration x seed runs in its own DVC workspace under "
        "studies/<name>/.",
    )
    actions = study.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        (
            "run",
            "validate the grid, then run every run not yet done (at most `parallel` at once) "
            "through a Prefect flow; ends with the report",
        ),
        ("status", "print each run's state: done, running, failed (with its message), not started"),
        (
            "report",
            "write studies/<name>/report/: the final round per configuration ranked by "
            "gold, and gold against √KL per configuration (offline)",
        ),
        (
            "serve",
            "serve `study run` as Prefect deployment rlhf-study/NAME on a schedule, e.g. "
            "to pick up runs added to the grid; needs `rlhf server` or PREFECT_API_URL",
        ),
    ):
        ap = actions.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        ap.add_argument("study", metavar="STUDY", help="a study file, e.g. studies/wolf-mini.yaml")
        if action in ("run", "status", "report"):
            ap.add_argument(
                "--pool",
                metavar="NAME",
                help="the runs are flow runs on this Prefect work pool, their rounds on the S3 remote (default: "
                "the study's `pool:`; docs/studies.md, Across machines)",
            )
        if action == "serve":
            _schedule_args(ap, "study")
    for step in STEPS:
        sp = sub.add_parser(step, help=_step_doc(step), description=_step_doc(step) + " (the DVC stage command)")
        if step in ROUND_STEPS:
            sp.add_argument("round", help="round name, e.g. r01 (a key of `rounds` in params.yaml)")
    return p


def _schedule_args(p: argparse.ArgumentParser, default_name: str) -> argparse.ArgumentParser:
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help="cron schedule, e.g. '0 2 * * *' (02:00 daily)")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS, e.g. 86400")
    p.add_argument(
        "--name",
        default=default_name if default_name == "iterate" else None,
        help=f"deployment name (default: {'iterate' if default_name == 'iterate' else 'the study file name'})",
    )
    if default_name == "iterate":
        p.add_argument("--more", type=int, default=1, metavar="N", help="rounds each run adds (default 1)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_preload"]:  # a flow's preload process (rlhf/orchestration/preload.py): runs steps by main
        from rlhf.orchestration.preload import serve

        return serve(argv[1], main)
    args = parser().parse_args(argv)
    if args.command in STEPS:
        die_with_parent()
        die_with_run()
    if args.command in STEPS and os.environ.get("PYTHONHASHSEED") != "0":
        # Fixed hash seed: libraries that write sets (e.g. PEFT's target_modules) then write them alike.
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "rlhf", *argv])
    if args.command in STEPS:
        from rlhf.orchestration.preload import hand_over

        if (code := hand_over(argv)) is not None:  # run in a flow's preload process (rlhf/orchestration/preload.py)
            sys.exit(code)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    from rlhf.core.ranks import is_main

    logging.getLogger("rlhf").setLevel(logging.INFO if is_main() else logging.WARNING)  # a launch's rank 0 logs
    try:
        sys.exit(_dispatch(args))
    except UserError as e:
        _fail(str(e))
    except OSError as e:  # a file or device the user can act on: one line, not a traceback
        _fail(f"{f'{e.filename}: ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        sys.exit(130)


def _fail(message: str) -> None:
    """The one-line error and exit 2. One write of the whole line: ranks of a launch share one stderr pipe,
    and print's separate write of the newline let two ranks' lines run together."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(2)


def _dispatch(args) -> int:
    from rlhf.core.config import load_config

    if args.command == "study":
        return _study(args)
    if args.command == "server":
        from rlhf.orchestration.server import serve_forever

        return serve_forever(args.host, args.port)
    if args.command in ("remote", "publish"):
        return _storage(args)
    if args.command == "params":
        return _params(args)
    if args.command == "run":
        return _run(args)
    if args.command == "verify":
        return _verify()
    cfg = load_config(PARAMS)
    if args.command == "check":
        return _check(cfg)
    if args.command == "metrics":
        from rlhf.evaluation.report import metrics_rows, metrics_table

        print(metrics_table(metrics_rows(["r00", *cfg.rounds])))
        return 0
    if args.command == "report":
        from rlhf.evaluation.report import write_report

        print(write_report(["r00", *cfg.rounds], args.out))
        return 0
    if args.command == "serve":
        if args.more < 1:
            raise UserError(f"--more must be at least 1 (got {args.more})")
        with _lasting_api():  # before anything imports Prefect, which reads its settings once
            from flows.iterate import iterate
            from flows.schedule import serve_flow

            serve_flow(iterate, args.name, cron=args.cron, interval=args.interval, parameters={"more": args.more})
        return 0
    if args.command == "stages":
        from rlhf.orchestration import stages
        from rlhf.orchestration.lock import project_lock

        with project_lock("rlhf stages"):  # not under a run, whose stages refuse a dvc.yaml they were not run for
            cfg, changed = stages.refresh(PARAMS)
        for line in changed or [f"{stages.DVC_YAML}: up to date ({len(cfg.rounds)} rounds)"]:
            print(line)
        return 0
    return _step(args, cfg)


def _check(cfg) -> int:
    """What a stage would check at its start, without running one; what `rlhf run` (or `rlhf stages`) rewrites
    before its first stage is noted."""
    from rlhf.core.config import read_yaml
    from rlhf.core.defaults import missing
    from rlhf.orchestration.preflight import check_inputs
    from rlhf.orchestration.stages import current

    check_inputs(cfg)
    notes = []
    if left_out := missing(read_yaml(PARAMS), cfg):
        notes.append(f"{len(left_out)} keys left out, whose defaults `rlhf run` or `rlhf stages` writes into it")
    if not current(cfg):
        notes.append("dvc.yaml is out of date (`rlhf run` or `rlhf stages` rewrites it)")
    print(f"{PARAMS}: ok ({len(cfg.rounds)} rounds)" + "".join(f"; {n}" for n in notes))
    return 0


def _step(args, cfg) -> int:
    """One step, as its DVC stage runs it, holding the project's lock (rlhf/orchestration/lock.py): under
    `rlhf run`, whose lock it shares, or by hand (`dvc repro`), when no other command may run here."""
    from rlhf.orchestration.lock import project_lock

    with project_lock(f"rlhf {args.command}" + (f" {args.round}" if hasattr(args, "round") else "")):
        return _step_locked(args, cfg)


def _step_locked(args, cfg) -> int:
    """One step: in this process, or as runtime.num_processes ranks of itself."""
    from rlhf.core.io import remove_scratch
    from rlhf.core.paths import round_paths
    from rlhf.core.processes import RUN_PID
    from rlhf.core.ranks import is_main, world_size
    from rlhf.orchestration import launch
    from rlhf.orchestration.preload import quiet_libraries

    rnd = getattr(args, "round", "r00")
    if args.command != "prepare" and rnd not in cfg.rounds:
        raise UserError(f"{PARAMS}: rounds: no round {rnd!r} (have {', '.join(cfg.rounds)})")
    if "DVC_STAGE" in os.environ and RUN_PID not in os.environ and "LOCAL_RANK" not in os.environ:
        from rlhf.orchestration.stages import require_current

        require_current(cfg)  # DVC runs it, not under `rlhf run` (which wrote dvc.yaml): `dvc repro` by hand
    if cmd := launch.command(cfg, args.command, rnd):  # runtime.num_processes ranks of this same command
        return launch.run(cmd)
    quiet_libraries()
    if is_main():  # the one writer
        remove_scratch(round_paths(rnd).root)  # what a killed earlier attempt left half-written
    fn = getattr(importlib.import_module(f"tasks.{args.command}"), args.command)
    started = time.perf_counter()
    summary = fn(cfg) if args.command == "prepare" else fn(cfg, rnd)
    launch.finish()
    if is_main():
        logging.getLogger("rlhf").info(footprint(args.command, rnd, time.perf_counter() - started))
        print(json.dumps({**summary, "processes": world_size()} if world_size() > 1 else summary, sort_keys=True))
    return 0


def footprint(step: str, rnd: str, seconds: float) -> str:
    """What a step cost, its last log line: seconds, peak memory and the bytes of the outputs it wrote."""
    from rlhf.core.io import disk_bytes
    from rlhf.core.paths import step_files
    from rlhf.core.processes import peak_memory

    wrote = disk_bytes(step_files(step, rnd)) / 2**20
    return f"{step} {rnd}: {seconds:,.1f} s, {peak_memory()}, wrote {wrote:,.2f} MiB"


def _run(args) -> int:
    """The flow, against PREFECT_API_URL or else a temporary server that lives (and dies) with this run, holding
    the project's lock from before anything starts. Ctrl-C or SIGTERM stops the running stage, records the
    flow run as crashed, stops the server and exits 128 + the signal's number with one line saying where the
    next `rlhf run` resumes (rlhf/orchestration/interrupts.py)."""
    from rlhf.core.config import load_config
    from rlhf.orchestration import interrupts
    from rlhf.orchestration.lock import project_lock
    from rlhf.orchestration.preflight import check_inputs
    from rlhf.orchestration.server import prefect_api

    with interrupts.interruptible():
        try:
            with project_lock(" ".join(["rlhf", *sys.argv[1:]])):
                check_inputs(load_config(PARAMS))
                with prefect_api():
                    from flows.iterate import iterate

                    iterate(force=args.force, more=args.more)
        except BaseException as e:
            if not (interrupts.ending() or isinstance(e, interrupts.Interrupted)):
                raise
            # Whatever Prefect raised on the way out, the run ended for the reason recorded in one line.
            line, code = interrupts.ending() or (
                f"interrupted ({e}) outside any stage; dvc.lock records the stages that finished, and `rlhf run` "
                "resumes at the first one not done",
                e.code,
            )
            interrupts.say(line)
            return code
    return 0


def _verify() -> int:
    from rlhf.orchestration.lock import project_lock
    from rlhf.orchestration.verify import LOCK, verify

    with project_lock("rlhf verify"):  # a run writing its rounds now would differ from dvc.lock for a moment
        checked, problems = verify()
    for line in problems:
        print(line)
    print(
        f"{LOCK}: {len(problems)} of {checked} outputs differ" if problems else f"{LOCK}: all {checked} outputs match"
    )
    return 1 if problems else 0


def _params(args) -> int:
    from rlhf.core import reference

    if args.markdown:
        print(reference.markdown(), end="")
        return 0
    found = [k for k in reference.keys() if not args.key or k.name == args.key or k.name.startswith(f"{args.key}.")]
    if not found:
        raise UserError(f"params: no key {args.key!r} (`rlhf params` lists them all)")
    width = max(len(k.name) for k in found)
    for k in found:
        print(f"{k.name.ljust(width)}  {k.description}" if k.section else f"{k.name.ljust(width)}  {reference.line(k)}")
    return 0


def _storage(args) -> int:
    from rlhf.orchestration import storage

    if args.command == "remote":
        print(storage.configure_remote(args.url, args.endpoint_url, args.name, check=not args.no_check))
        print("push with `dvc push` (or storage.push: true in params.yaml), fetch with `dvc pull`")
        return 0
    from rlhf.core.config import round_index

    round_index(args.round)
    done = storage.publish(args.round, args.dest, args.endpoint_url)
    print(
        f"published {args.round} to {args.dest.rstrip('/')}/{args.round}/: {len(done['uploaded'])} files uploaded, "
        f"{len(done['skipped'])} already there unchanged"
    )
    return 0


def _study(args) -> int:
    from rlhf.orchestration.preflight import check_study
    from rlhf.studies import grid, report

    s = grid.load_study(args.study)  # the whole grid is validated before anything runs or is created
    if args.action in ("run", "status", "report") and (args.pool or s.spec.pool):
        return _study_on_pool(args, s)
    if args.action == "status":
        print(grid.status_table(s))
        return 0
    if args.action == "report":
        print(f"{report.markdown_table(report.final_rows(s), report.axis_names(s))}\nreport: {report.write_report(s)}")
        return 0
    check_study(s)
    if args.action == "serve":
        with _lasting_api():  # before anything imports Prefect, which reads its settings once
            from flows.schedule import serve_flow
            from flows.study import study as study_flow

            serve_flow(
                study_flow,
                args.name or s.path.stem,
                cron=args.cron,
                interval=args.interval,
                parameters={"path": args.study},
            )
        return 0
    from rlhf.orchestration.server import prefect_api

    def stopped(signal_name: str) -> str:
        states = [grid.run_status(s, r, active=False)[0] for r in s.runs]
        return (
            f"interrupted ({signal_name}): {states.count('interrupted')} runs stopped where `rlhf study run "
            f"{args.study}` resumes them, {states.count('done')} of {len(s.runs)} done"
        )

    def run() -> None:
        with prefect_api():  # the study's runs report to the same server
            from flows.study import study as study_flow

            study_flow(args.study)

    return _until_signalled(run, stopped)  # the study passes a signal on to its runs (flows/study.py, stop_runs)


def _until_signalled(body, line) -> int:
    """body(), 0; or, when Ctrl-C or SIGTERM stops it, the one line `line(signal name)` and 128 + the signal
    (whatever Prefect logs or raises on its way out stays off the console: rlhf/orchestration/interrupts.py)."""
    import signal

    from rlhf.orchestration import interrupts

    with interrupts.interruptible():
        try:
            body()
        except BaseException:
            if not (signum := interrupts.signalled()):
                raise
            interrupts.say(line(signal.Signals(signum).name))
            return 128 + signum
    return 0


def _study_on_pool(args, s) -> int:
    """A study on a work pool: the code the workers clone must be pushed before `run`; the runs' states are on
    the server (`status`), their rounds on the remote (`report`)."""
    from rlhf.orchestration import pool
    from rlhf.orchestration.preflight import check_study
    from rlhf.studies import grid, report

    where = pool.resolve(s, args.pool, deploying=args.action == "run")
    if args.action == "report":
        print(f"records of {pool.mirror(s, where)} runs pulled from {where.remote}")
        print(f"{report.markdown_table(report.final_rows(s), report.axis_names(s))}\nreport: {report.write_report(s)}")
        return 0
    if args.action == "run":
        check_study(s)
    with _lasting_api("for the workers: start one where they reach it (`rlhf server --host 0.0.0.0`) and set"):
        if args.action == "status":
            print(grid.status_table(s, pool.status_rows(s, where)))
            return 0
        from flows.study import study as study_flow

        def following(signal_name: str) -> str:
            return (
                f"interrupted ({signal_name}): the runs on work pool {where.name!r} go on; `rlhf study status "
                f"{args.study} --pool {where.name}` shows them, `rlhf study run` again follows them to the report"
            )

        return _until_signalled(lambda: study_flow(args.study, args.pool), following)


def _lasting_api(missing: str = "to serve on: start one with `rlhf server` (in another terminal), or set"):
    """A server that outlives this process (a schedule's, a work pool's): PREFECT_API_URL, or this project's
    `rlhf server`."""
    from rlhf.orchestration.server import prefect_api, project_server

    if not (os.environ.get("PREFECT_API_URL") or project_server()):
        raise UserError(f"no Prefect server {missing} PREFECT_API_URL")
    return prefect_api()


if __name__ == "__main__":
    main()
