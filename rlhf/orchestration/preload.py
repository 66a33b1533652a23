"""Step processes forked from one that has imported torch, transformers, TRL and PEFT already.

A flow runs every step as its DVC stage, so as a new process, and a new process spends 3-5 s of a step
importing the ML libraries on a small machine (bench/orchestration.py measures it): more than a whole step
of the embedded default takes. So `rlhf run` starts one preload process per flow run, which listens on a
Unix socket (named in RLHF_PRELOAD, which the stages inherit) and imports those libraries once. A step's
command, `rlhf generate r01` as DVC starts it, passes its arguments, working directory, environment and
standard streams over the socket and waits; the preload process forks a child that runs the step exactly
as the command would have (its streams, its seed, its error messages and exit status) and the command
exits with the child's status. Each child is a fresh copy of the preloaded process, so steps share nothing.

Without RLHF_PRELOAD (`dvc repro` by hand), or when its socket does not answer, the command runs the step
itself. A child exits when the command that asked for it is gone (killed with its run: rlhf/core/processes.py),
and the preload process dies with the flow's process. The preload process is the CLI's own (`python -m rlhf
_preload SOCKET`), which hands `serve` its `main`: this layer runs the command without importing it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rlhf.core.processes import die_with, die_with_parent

ENV = "RLHF_PRELOAD"
SERVE = "_preload"  # the hidden CLI command that starts a preload process


@contextmanager
def preloaded(env: dict[str, str]) -> Iterator[None]:
    """For the duration: a preload process with the stages' environment `env`, named in os.environ[ENV]
    (Linux: elsewhere each step imports for itself)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    folder = Path(tempfile.mkdtemp(prefix="rlhf-preload-"))
    path = folder / "socket"
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "rlhf", SERVE, str(path)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches the run alone, which stops it (rlhf/orchestration/interrupts.py)
    )
    deadline = time.monotonic() + 10
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:  # it listens before importing
        time.sleep(0.05)
    os.environ[ENV] = str(path)
    try:
        yield
    finally:
        os.environ.pop(ENV, None)
        proc.kill()  # its children are steps that have finished, or that end with their commands
        proc.wait()
        path.unlink(missing_ok=True)
        folder.rmdir()


def hand_over(argv: list[str]) -> int | None:
    """In a step's command: have the preload process run it; its exit status, or None to run it here."""
    path = os.environ.get(ENV)
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one request, one message
    try:
        conn.connect(path)
    except OSError:
        return None
    env = {k: v for k, v in os.environ.items() if k != ENV}
    request = {"argv": argv, "cwd": os.getcwd(), "env": env, "pid": os.getpid()}
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    if not conn.recv(1):  # the preload process ended before it took the step on: run it here
        return None
    status = conn.recv(1)  # when the step is done
    if not status:
        print("error: the step's process ended without a status (killed?)", file=sys.stderr)
        return 137
    return status[0]


def serve(path: str, main: Callable[[list[str]], None]) -> None:
    """The preload process: listen, import, then fork a child for each request, which runs `main(argv)`."""
    import signal

    import setproctitle  # noqa: F401  (before the environment changes: it takes over the memory of argv)

    die_with_parent()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen()  # a step that asks now waits in the backlog until the imports are done
    quiet_libraries()  # the variables the libraries read as they load, as a step sets them
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401
    from trl import DPOTrainer, RewardTrainer  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped as they end; statuses go by socket
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the step waits for its own subprocesses
            _child(conn, main)
        conn.close()


def _child(conn: socket.socket, main: Callable[[list[str]], None]) -> None:
    """Become the step's process: its streams, folder and environment; run it; report the exit status."""
    import setproctitle

    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    request = json.loads(message)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    setproctitle.setproctitle(" ".join(["rlhf", *request["argv"]]))  # as `ps` shows the command
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    die_with(request["pid"])  # the command that asked: killed, it takes this step with it
    conn.send(b"+")  # taken on
    code = 1
    try:
        main(request["argv"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        conn.send(bytes([code & 0xFF]))
        os._exit(code)


def quiet_libraries() -> None:
    """Keep a step's log readable: no library chatter, and no progress bars when nobody watches a terminal.
    Said through the variables the libraries read when they load, so a step that needs none of them (label
    with the rubric judge) does not pay their import; a user's own setting of one wins."""
    import warnings

    quiet = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    if not sys.stderr.isatty():  # transformers' bars follow huggingface_hub's switch
        quiet |= {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    for key, value in quiet.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
