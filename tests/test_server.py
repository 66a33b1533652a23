"""`rlhf server` as a user restarts it: on the same port at once, and with a warning when it listens beyond
this machine (the Prefect API has no authentication)."""

from __future__ import annotations

import subprocess
import time
import urllib.request

from rlhf.core.processes import free_port, stop
from tests.conftest import BIN


def serve(folder, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [BIN / "rlhf", "server", *args], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_up(folder, proc: subprocess.Popen, timeout: float = 120) -> None:
    record = folder / ".prefect" / "server.json"
    deadline = time.monotonic() + timeout
    while not record.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_stopped_server_can_listen_on_its_port_again_at_once(tmp_path):
    port = free_port()
    first = serve(tmp_path, "--port", str(port))
    try:
        wait_up(tmp_path, first)
        for _ in range(3):  # each answered request leaves the server's side of its connection in TIME_WAIT
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=10).read()
    finally:
        stop(first, timeout=30)
    assert "warning" not in first.stderr.read()  # 127.0.0.1, the default: nothing to warn about
    again = serve(tmp_path, "--port", str(port))
    try:
        wait_up(tmp_path, again)  # before SO_REUSEADDR: "error: cannot listen on 127.0.0.1:PORT (Address in use)"
    finally:
        stop(again, timeout=30)


def test_a_server_listening_beyond_this_machine_warns(tmp_path):
    port = free_port("0.0.0.0")
    proc = serve(tmp_path, "--host", "0.0.0.0", "--port", str(port))
    try:
        line = proc.stderr.readline()  # said before the server starts
    finally:
        stop(proc, timeout=30)
    assert line.startswith(f"warning: the Prefect API on 0.0.0.0:{port} has no authentication")
