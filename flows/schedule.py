"""Serving a flow on a schedule: one deployment, runs started by this process while it lives.

Prefect's `flow.serve` registers a deployment with the schedule and polls the server for its due runs,
starting each in a subprocess in the current directory (the project). At most one run of a deployment
goes at a time (a global concurrency limit on the server, so a run started by hand with `prefect
deployment run` waits too): two runs on one project would race on the same files.
"""

from __future__ import annotations

from typing import Any

from rlhf.core.errors import UserError


def schedule_of(cron: str | None, interval: float | None):
    """The Prefect schedule for exactly one of a cron expression or an interval in seconds."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    if (cron is None) == (interval is None):
        raise UserError("give exactly one of --cron EXPR or --interval SECONDS")
    if interval is not None:
        if interval <= 0:
            raise UserError(f"--interval must be a positive number of seconds (got {interval:g})")
        from datetime import timedelta

        return IntervalSchedule(interval=timedelta(seconds=interval))
    try:
        return CronSchedule(cron=cron)
    except ValueError:
        raise UserError(
            f"--cron: not a cron expression: {cron!r} (five fields, e.g. '0 2 * * *' for 02:00 daily)"
        ) from None


def serve_flow(
    flow, name: str, *, cron: str | None = None, interval: float | None = None, parameters: dict[str, Any] | None = None
) -> None:
    """Serve `flow` as deployment `<flow name>/<name>` with the schedule, until interrupted."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    schedule = schedule_of(cron, interval)
    print(
        f"serving {flow.name}/{name} ({'cron ' + cron if cron else f'every {interval:g} s'}, "
        f"parameters {parameters or {}}); Ctrl-C stops it"
    )
    flow.serve(
        name=name,
        schedule=schedule,
        parameters=parameters or {},
        limit=1,
        print_starting_message=False,
        global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
    )
