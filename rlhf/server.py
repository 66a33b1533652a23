"""The project's Prefect server: `rlhf server` keeps one running with its state under .prefect/.

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
import urllib.request
from pathlib import Path

from rlhf.errors import UserError
from rlhf.lifetime import dying_with_parent

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
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another port with --port") from None
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    api_url = f"http://{shown}:{port}/api"
    HOME.mkdir(exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(HOME.resolve()), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": api_url}
    env.pop("PREFECT_API_URL", None)  # the server is not a client of another one
    # In the foreground `prefect server start` serves in its own process, which dies with this one.
    proc = subprocess.Popen(dying_with_parent("prefect", "server", "start", "--host", host, "--port", str(port)),
                            env=env, stdin=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a service manager's stop: clean up as for Ctrl-C
    try:
        import time

        while not healthy(api_url):
            if proc.poll() is not None:
                raise UserError(f"the Prefect server exited with status {proc.returncode} (see its output above)")
            time.sleep(0.5)
        RECORD.write_text(json.dumps({"api_url": api_url, "pid": proc.pid}))
        print(f"Prefect UI: http://{shown}:{port}  (state in {HOME}/; Ctrl-C stops it)\n"
              f"`rlhf run`, `rlhf serve` and `rlhf study run` in this project report to it; elsewhere "
              f"export PREFECT_API_URL={api_url}", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        RECORD.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
