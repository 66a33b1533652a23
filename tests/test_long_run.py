"""A long run: 20 rounds of a tiny configuration through `rlhf run`. The long-lived flow process must not
grow by more than 10% between round 5 and round 20; the disk each round takes is reported. Slow."""

import re
import subprocess

import pytest

from tests.conftest import BIN, TINY, deep_update, make_project

pytestmark = pytest.mark.slow
ROUNDS = 20
LONG = deep_update(
    TINY,
    {
        "rounds": {f"r{i:02d}": f"r{i - 1:02d}" for i in range(1, ROUNDS + 1)},
        "prepare": {"tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64}, "sft_epochs": 1.0},
        "generate": {"k": 2, "max_new_tokens": 16},
        "label": {"unfinished": "keep"},  # 16 tokens cut many answers short: pair them too
        "train_rm": {"epochs": 1.0},
        "update_policy": {"k": 2, "dpo": {"epochs": 1.0}},
        "evaluate": {"samples_per_prompt": 2, "max_new_tokens": 16, "landscape": {"axes": {}}},
    },
)


def test_twenty_rounds_run_through_and_the_flow_process_does_not_grow(tmp_path, capsys):
    project = make_project(tmp_path / "project", LONG)
    out = subprocess.run([BIN / "rlhf", "run"], cwd=project, capture_output=True, text=True, timeout=3 * 3600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.findall(
        r"(r\d\d) done: data/rounds/\1 holds ([\d.]+) MiB; the flow process uses (\d+) MiB", out.stdout + out.stderr
    )
    disk = {rnd: float(mib) for rnd, mib, _ in found}
    rss = {rnd: int(mib) for rnd, _, mib in found}
    assert len(rss) == ROUNDS + 1  # r00 and every round
    growth = rss["r20"] / rss["r05"] - 1
    per_round = sum(disk[f"r{i:02d}"] for i in range(1, ROUNDS + 1)) / ROUNDS
    with capsys.disabled():  # the figure, in CI's log too
        print(
            f"\nflow process: {rss['r05']} MiB after r05, {rss['r20']} MiB after r20 ({growth:+.1%}); "
            f"disk per round {per_round:.1f} MiB (r00: {disk['r00']:.1f} MiB)"
        )
    assert growth <= 0.10
