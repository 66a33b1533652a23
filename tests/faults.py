"""A quick project for the fault tests: the tiny one, cheaper still (a whole `rlhf run` takes about 30 s on 2
cores), whose gold judge is a Python callable kept in the project that can hold one named stage still (while a
file `hold` names it) until the test lets it go: the moment a signal or a second command lands is then
inside that stage on a machine of any speed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from tests.conftest import BIN, TINY, deep_update, make_project

QUICK = deep_update(
    TINY,
    {
        "runtime": {"threads": 1},
        # the quick policy rarely ends within 8 tokens: its cut-off answers are paired too
        "label": {"judge": {"type": "python", "name": "project_judge:score", "best": 1.0}, "unfinished": "keep"},
        "prepare": {
            "sft": "data/sft_small.jsonl",
            "sft_epochs": 1.0,
            "tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "pretrain_epochs": 0.0},
        },
        "generate": {"k": 2, "max_new_tokens": 8},
        "train_rm": {"epochs": 1.0},
        "update_policy": {"k": 2, "dpo": {"epochs": 1.0}},
        "evaluate": {"samples_per_prompt": 1, "max_new_tokens": 8, "landscape": {"axes": {}}},
    },
)
PROMPTS = {"label": 64, "policy": 32, "eval": 12}  # rows of each prompt set (make_project keeps 200, 64, 24)
# The rubric, held while `hold` names the stage that calls it (DVC sets DVC_STAGE); `holding` says it is held.
JUDGE = """import os
import time
from pathlib import Path

from rlhf.judges import PinkElephantJudge

_RUBRIC = PinkElephantJudge("data/world.json")


def score(prompts, responses):
    hold = Path("hold")
    if hold.is_file() and os.environ.get("DVC_STAGE") == hold.read_text().strip():
        Path("holding").write_text(str(os.getpid()))
        while hold.is_file():
            time.sleep(0.05)
    return _RUBRIC.score(prompts, responses)
"""


def quick_project(dest: Path) -> Path:
    project = dest
    (project / "project_judge.py").parent.mkdir(parents=True, exist_ok=True)
    (project / "project_judge.py").write_text(JUDGE)  # before the stages are written: a dep of the judge's stages
    make_project(project, QUICK)
    for name, rows in (("sft.jsonl", 200), *((f"prompts/{s}.jsonl", n) for s, n in PROMPTS.items())):
        lines = (project / "data" / name).read_text().splitlines(keepends=True)
        (project / "data" / name.replace("sft.", "sft_small.")).write_text("".join(lines[:rows]))
    return project


def hold(project: Path, stage: str) -> None:
    (project / "holding").unlink(missing_ok=True)
    (project / "hold").write_text(stage)


def release(project: Path) -> None:
    (project / "hold").unlink(missing_ok=True)


def wait_held(project: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (project / "holding").exists():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before its stage was held"
        assert time.monotonic() < deadline, "the held stage never started"
        time.sleep(0.05)


def start(project: Path, *args: str, env: dict, stderr) -> subprocess.Popen:
    """`rlhf ARGS` as a terminal starts it: the leader of its own process group (which Ctrl-C signals as a
    whole), SIGINT at its default (a process started in the background of a script inherits it ignored)."""
    return subprocess.Popen(
        [BIN / "rlhf", *args],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def env_for(base: Path) -> dict:
    """The environment of the project's commands: Prefect's state (the database every run reports to) in `base`."""
    return {**os.environ, "PREFECT_HOME": str(base / "prefect")}


def recorded(project: Path) -> set[str]:
    """The stages dvc.lock records."""
    lock = project / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.exists() else set()
