"""Which rank of a several-process step this process is (`runtime.num_processes`, rlhf/orchestration/launch.py).

Only the main rank (RANK 0) writes artifacts: rlhf/core/io.py's writers do nothing on the others.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0
