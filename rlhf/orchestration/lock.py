"""One command at a time in a project: `rlhf run`, a run that `rlhf serve` starts, a step run by hand.

Two of them would race on the same rounds: both run train_rm@r02, one renames its model over the one the
other is reading, and each rewrites dvc.lock. So each takes an flock on .dvc/tmp/rlhf-project.lock (ignored by
git and DVC) before anything starts and holds it to its end; a second one stops at once, in one line naming
the holder's PID and command, which the file records. The kernel frees an flock when its holder dies, however it
dies, so a killed run's lock never blocks the next one. The holder's own children (the stages a run starts,
the ranks of a launch) are the same command, not a second one: the holder puts the token it wrote into
RLHF_LOCK, which they inherit, and a command whose token is the one in the file goes on without the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rlhf.core.errors import UserError

PATH = Path(".dvc/tmp/rlhf-project.lock")
ENV = "RLHF_LOCK"


@contextmanager
def project_lock(command: str) -> Iterator[None]:
    """Hold the project's lock for the duration, as `command` (what the refusal of a second one names)."""
    if not PATH.parent.parent.is_dir():  # not a DVC project: no rounds to race on, and no .dvc/tmp to create
        yield
        return
    PATH.parent.mkdir(exist_ok=True)
    with open(PATH, "a+", encoding="utf-8") as f:  # O_CLOEXEC: the servers and stages it starts do not hold it
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            if holder.get("token") and holder["token"] == os.environ.get(ENV):
                yield  # started by the holder: part of its command
                return
            raise UserError(_refusal(holder)) from None
        token = f"{os.getpid()}-{secrets.token_hex(8)}"
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "command": command, "token": token}) + "\n")
        f.flush()
        before = os.environ.get(ENV)
        os.environ[ENV] = token
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = before


def _holder(f) -> dict:
    f.seek(0)
    try:
        holder = json.loads(f.read())
    except ValueError:  # the holder is writing it this instant
        return {}
    return holder if isinstance(holder, dict) else {}


def _refusal(holder: dict) -> str:
    who = f"PID {holder['pid']} ({holder.get('command', '?')})" if "pid" in holder else "another rlhf command"
    return (
        f"{PATH}: {who} is running in this project; one command at a time (wait for it, or stop it: Ctrl-C in "
        "its terminal, or `kill` its PID)"
    )
