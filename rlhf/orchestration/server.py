"""The Prefect API a run reports to: the project's `rlhf server` (state under .prefect/), PREFECT_API_URL,
or a temporary server that lives and dies with the run.

While it runs, .prefect/server.json says where, so that `rlhf run`, `rlhf serve` and `rlhf study` in
another terminal report to it without any setting (PREFECT_API_URL, when set, still wins).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from rlhf.core.errors import UserError
from rlhf.core.processes import dying_with_parent, free_port, stop

HOME = Path(".prefect")
RECORD = HOME / "server.json"


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def project_server() -> str | None:
    """The API URL of this project's running `rlhf server`, if one answers."""
    try:
        url = json.loads(RECORD.read_text())["api_url"]
    except (OSError, ValueError, KeyError):
        return None
    return url if healthy(url) else None


def serve_forever(host: str, port: int) -> int:
    """Run `prefect server start` in the foreground (state in .prefect/) until Ctrl-C."""
    with socket.socket() as s:
        # As the server itself binds (uvicorn sets SO_REUSEADDR): a port that a stopped server's connections
        # hold in TIME_WAIT for a minute is free to listen on again at once.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another port with --port") from None
    if not loopback(host):
        print(
            f"warning: the Prefect API on {host}:{port} has no authentication: anyone who can reach this port can "
            "read, start and cancel runs; bind to 127.0.0.1 (the default) unless the network is yours alone",
            file=sys.stderr,
            flush=True,
        )
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    api_url = f"http://{shown}:{port}/api"
    HOME.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(HOME.resolve()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": api_url,
    }
    env.pop("PREFECT_API_URL", None)  # the server is not a client of another one
    # In the foreground `prefect server start` serves in its own process, which dies with this one.
    proc = subprocess.Popen(
        dying_with_parent("prefect", "server", "start", "--host", host, "--port", str(port)),
        env=env,
        stdin=subprocess.DEVNULL,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a service manager's stop: clean up as for Ctrl-C
    try:
        while not healthy(api_url):
            if proc.poll() is not None:
                raise UserError(f"the Prefect server exited with status {proc.returncode} (see its output above)")
            time.sleep(0.5)
        RECORD.write_text(json.dumps({"api_url": api_url, "pid": proc.pid}))
        print(
            f"Prefect UI: http://{shown}:{port}  (state in {HOME}/; Ctrl-C stops it)\n"
            f"`rlhf run`, `rlhf serve` and `rlhf study run` in this project report to it; elsewhere "
            f"export PREFECT_API_URL={api_url}",
            flush=True,
        )
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        RECORD.unlink(missing_ok=True)
        stop(proc, timeout=15)


def loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback (127.0.0.0/8, ::1)."""
    import ipaddress

    try:
        found = {a[4][0] for a in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)


@contextmanager
def temporary_prefect_server(timeout: float = 60) -> Iterator[str]:
    """Prefect's temporary API server for a run without PREFECT_API_URL (as Prefect's own ephemeral mode
    starts it, on a free loopback port, no UI), but dying with this process. Yields its API URL."""
    import importlib.util

    port = free_port()
    site = Path(importlib.util.find_spec("prefect").origin).parent.parent
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }  # offline: no telemetry errors in the log
    cmd = dying_with_parent(
        "uvicorn",
        "--app-dir",
        str(site),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    )
    url = f"http://127.0.0.1:{port}/api"
    # A session of its own: Ctrl-C in the terminal reaches the run alone, which reports the interruption to this
    # server before it stops it (rlhf/orchestration/interrupts.py); it still dies with the run if that is killed.
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise UserError(
                    f"the temporary Prefect server on port {port} did not start "
                    f"(exit code {proc.poll()}); set PREFECT_API_URL to use a running one"
                )
            time.sleep(0.2)
        print(
            f"Prefect: a temporary API server for this run at {url} (no UI; it stops with the run); to keep "
            "runs and browse them, start a server and set PREFECT_API_URL",
            file=sys.stderr,
        )
        yield url
    finally:
        stop(proc)


@contextmanager
def prefect_api() -> Iterator[str]:
    """The Prefect API a flow run reports to: PREFECT_API_URL if set, else the project's `rlhf server` if one
    runs, else a temporary server for this process (which its child processes, e.g. a study's runs, share).
    On the way out the run's last log lines are sent while the server still listens."""
    given = os.environ.get("PREFECT_API_URL") or project_server()
    with nullcontext(given) if given else temporary_prefect_server() as url:
        os.environ["PREFECT_API_URL"] = url  # before Prefect reads its settings
        try:
            yield url
        finally:
            from prefect.logging.handlers import APILogWorker

            if healthy(url):  # a server that is gone takes none of them: no waiting on it
                APILogWorker.drain_all(timeout=5)


def api_url() -> str | None:
    """The API this process's Prefect client talks to (in a flow run)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url).rstrip("/") if url else None


def abandon_api() -> None:
    """The server is gone: let Prefect's client fail at once instead of retrying each call for about a minute,
    send no more log lines, and print nothing about the ones it could not send."""
    import logging

    from prefect.settings import get_current_settings

    settings = get_current_settings()
    settings.client.max_retries = 0
    settings.logging.to_api.enabled = False
    logging.raiseExceptions = False
