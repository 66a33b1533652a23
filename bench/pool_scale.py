"""A pool study's follower and report at lab scale: does their cost grow with the runs, not with their square?

A real Prefect server (Prefect's test harness) and an S3 API server (moto) on loopback, a study of N runs
(N/2 configurations x 2 seeds) and no worker: the runs are submitted and stay scheduled, as on a busy pool.
For N = 50 and 200 it measures, in this process: the follower's polls (`Follower.poll`, what `rlhf study run
--pool` does every 5 s) while every run waits for its seed's `prepare` and once all are in flight (the CPU
seconds per poll, and the wall time with the server's answers); then, with a record of 3 rounds per run on
the remote, `rlhf study report --pool`'s work (mirror the records and metrics, write the report), the
first time and again. Linear cost: the 200-run numbers are about 4x the 50-run ones (a quadratic cost
would be 16x). Takes about 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import yaml
from _common import ROOT, fresh_project, parser, report, table

from tests.test_storage import KEYS, start_moto

SIZES = (50, 200)
ROUNDS = ("r00", "r01", "r02", "r03")


def main() -> None:
    args = parser(__doc__, repeats=False).parse_args()
    os.environ.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        AWS_ACCESS_KEY_ID=KEYS["aws_access_key_id"],
        AWS_SECRET_ACCESS_KEY=KEYS["aws_secret_access_key"],
        AWS_DEFAULT_REGION=KEYS["region_name"],
    )
    (args.out / "moto").mkdir(parents=True, exist_ok=True)
    moto, endpoint = start_moto(args.out / "moto")
    try:
        found = {n: measure(args.out / f"pool-{n}", n, endpoint) for n in SIZES}
    finally:
        moto.kill()
    small, big = (found[n] for n in SIZES)
    rows = [[what, small[what], big[what], big[what] / small[what]] for what in small]
    header = ["seconds", f"{SIZES[0]} runs", f"{SIZES[1]} runs", f"{SIZES[1] // SIZES[0]}x runs: ratio"]
    report("pool_scale", args.out, table(header, rows), found)


def measure(project_dir, n: int, endpoint: str) -> dict[str, float]:
    import boto3
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from rlhf.orchestration import pool
    from rlhf.studies.grid import load_study
    from rlhf.studies.report import write_report

    project = fresh_project(project_dir, {"prepare": {"tiny": {"pretrain_epochs": 0.0}}})
    os.chdir(project)
    spec = {"axes": {"train_rm.epochs": [1.0 + i / 10 for i in range(n // 2)]}, "seeds": [0, 1], "rounds": 3}
    (project / "studies").mkdir()
    (project / "studies" / "lab.yaml").write_text(yaml.safe_dump(spec))
    study = load_study("studies/lab.yaml")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"lab{n}"
    s3.create_bucket(Bucket=bucket)
    where = pool.Pool("lab-pool", f"s3://{bucket}/rlhf", endpoint, str(project), None)
    out = {}
    with prefect_test_harness(server_startup_timeout=60), get_client(sync_client=True) as c:
        c.create_deployment(c.create_flow_from_name(pool.FLOW), "lab")
        follower = pool.Follower(study, where, lambda line: None)
        follower.poll()  # submits the first run of each seed
        out["poll, waiting for prepare (CPU)"], out["poll, waiting for prepare (wall)"] = polls(follower)
        for run in study.runs[:2]:  # each seed's prepare pushed: the next poll submits every other run
            record(s3, bucket, run.id, {"prepare": {"outs": []}})
        follower.poll()
        out["poll, all in flight (CPU)"], out["poll, all in flight (wall)"] = polls(follower)
    metrics = {r: json.dumps(round_metrics(r, i)).encode() for i, r in enumerate(ROUNDS)}
    for run in study.runs:
        stages = {}
        for rnd, text in metrics.items():
            md5 = hashlib.md5(text).hexdigest()
            s3.put_object(Bucket=bucket, Key=f"rlhf/files/md5/{md5[:2]}/{md5[2:]}", Body=text)
            out_ = {"path": f"data/rounds/{rnd}/metrics.json", "md5": md5, "size": len(text), "hash": "md5"}
            stages["prepare" if rnd == "r00" else f"evaluate@{rnd}"] = {"outs": [out_]}
        record(s3, bucket, run.id, stages)
    for label in ("report, first", "report, again"):
        began = time.perf_counter()
        pool.mirror(study, where)
        write_report(study)
        out[label] = time.perf_counter() - began
    os.chdir(ROOT)
    return out


def round_metrics(rnd: str, i: int) -> dict:
    """A round's metrics.json with what the study report reads (the numbers made up, the shape evaluate's)."""
    gold, kl = 0.65 + 0.05 * i, 1.5 * i
    return {
        "round": rnd,
        "gold": {"mean": gold, "sem": 0.01},
        "proxy": {"mean": 0.1 * i, "sem": 0.02},
        "kl": {"per_sequence": kl, "per_sequence_sem": 0.1, "d": kl**0.5},
        "proxy_accuracy": {"mean": 0.7},
        "alarms": [],
    }


def polls(follower, times: int = 3) -> tuple[float, float]:
    """The median CPU seconds (this process) and wall seconds of a poll."""
    cpu, wall = [], []
    for _ in range(times):
        c, w = time.process_time(), time.perf_counter()
        follower.poll()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return sorted(cpu)[times // 2], sorted(wall)[times // 2]


def record(s3, bucket: str, run_id: str, stages: dict) -> None:
    """A run's record on the remote, as a worker keeps it (its dvc.lock naming its stages' outputs)."""
    key = f"rlhf/studies/lab/{run_id}"
    s3.put_object(Bucket=bucket, Key=f"{key}/dvc.lock", Body=yaml.safe_dump({"schema": "2.0", "stages": stages}))
    s3.put_object(Bucket=bucket, Key=f"{key}/params.yaml", Body=json.dumps({"rounds": {}}))


if __name__ == "__main__":
    main()
