"""Pairing, JSONL reading and the round paths, on hand-made rows."""

import json
import shutil

import numpy as np
import pytest
import yaml

from rlhf.core.errors import UserError
from rlhf.core.io import atomic_dir, read_jsonl, write_jsonl
from rlhf.core.paths import ROUND_STEPS, STEP_OUTPUT, round_paths
from rlhf.core.prompts import read_prompts
from rlhf.judges import checked
from rlhf.ml.pairs import best_worst, group_by_prompt, pairs_of
from tests.conftest import ROOT


def test_best_worst_pairs_and_ties():
    scores = np.array([[0.1, 0.9, 0.5], [0.7, 0.7, 0.7], [0.3, 0.2, 0.8]])
    best, worst, valid = best_worst(scores)
    assert best.tolist() == [1, 0, 2] and worst.tolist() == [0, 0, 1]
    assert valid.tolist() == [True, False, True]  # an all-tied prompt gives no pair


def test_pairs_best_worst_and_all_pairs_with_ties_skipped_or_kept():
    scores = np.array([[0.1, 0.9, 0.5], [0.7, 0.7, 0.7], [0.3, 0.3, 0.8]])
    got = lambda how, ties: sorted(zip(*(a.tolist() for a in pairs_of(scores, how, ties))))  # noqa: E731
    assert got("best_worst", "skip") == [(0, 1, 0), (2, 2, 0)]
    assert got("best_worst", "keep") == [(0, 1, 0), (1, 0, 0), (2, 2, 0)]
    assert got("all_pairs", "skip") == [(0, 1, 0), (0, 1, 2), (0, 2, 0), (2, 2, 0), (2, 2, 1)]
    assert len(got("all_pairs", "keep")) == 9  # 3 prompts x 3 pairs, ties included
    p, c, r = pairs_of(scores, "all_pairs", "skip")
    assert (scores[p, c] > scores[p, r]).all()  # the higher score is always the chosen one


def test_label_noise_flips_the_configured_fraction_seeded(tmp_path, monkeypatch):
    from rlhf.core.config import Config
    from rlhf.ml.pairs import read_pairs
    from tasks.label import label

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "data" / "world.json", tmp_path / "world.json")
    rng = np.random.default_rng(0)
    topics = ["ocean", "forest"]
    rows = [
        {
            "prompt_id": f"p{i}",
            "prompt": f"user : describe the {topics[i % 2]} . assistant :",
            "messages": [{"role": "user", "content": f"describe the {topics[i % 2]} ."}],
            "response": " " + " ".join(["the water is blue ."] * int(n)),
            "finished": True,
        }
        for i in range(300)
        for n in rng.integers(0, 5, 4)
    ]
    write_jsonl(round_paths("r01").samples, rows)
    cfg = Config.model_validate(
        {"rounds": {"r01": "r00"}, "label": {"world": "world.json", "noise": 0.25, "pairs": "all_pairs"}}
    )
    summary = label(cfg, "r01")
    pairs = read_pairs(round_paths("r01").labels)
    flipped = [p for p in pairs if p["flipped"]]
    assert summary["pairs"] == len(pairs) > 900 and summary["flipped"] == len(flipped)
    assert abs(len(flipped) / len(pairs) - 0.25) < 3 * (0.25 * 0.75 / len(pairs)) ** 0.5
    assert all(p["chosen_gold"] < p["rejected_gold"] for p in flipped)  # flipped: the worse one is "chosen"
    assert all(p["chosen_gold"] > p["rejected_gold"] for p in pairs if not p["flipped"])
    before = round_paths("r01").labels.read_bytes()
    label(cfg, "r01")
    assert round_paths("r01").labels.read_bytes() == before  # seeded: the same flips again


def test_group_by_prompt_needs_equal_k():
    rows = [{"prompt_id": "a"}, {"prompt_id": "b"}, {"prompt_id": "a"}, {"prompt_id": "b"}]
    assert [[r["prompt_id"] for r in g] for g in group_by_prompt(rows, "x")] == [["a", "a"], ["b", "b"]]
    with pytest.raises(UserError, match="same number"):
        group_by_prompt(rows[:3], "samples.jsonl")


def test_judge_nan_is_named():
    with pytest.raises(UserError, match="returned nan for sample 2"):
        checked(np.array([0.5, np.nan]), "samples.jsonl")


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n')
    with pytest.raises(UserError, match=r"p.jsonl:2: malformed JSON"):
        read_jsonl(path)
    path.write_text('{"id": "a"}\n')
    with pytest.raises(UserError, match=r"p.jsonl:1: missing field 'prompt'"):
        read_jsonl(path, required=("id", "prompt"))
    path.write_bytes(b'{"id": "a", "prompt": "\xff"}\n')
    with pytest.raises(UserError, match="not valid UTF-8"):
        read_jsonl(path)
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(UserError, match="row 2: duplicate id 'a'"):
        read_prompts(path)
    path.write_text("\n")
    with pytest.raises(UserError, match="no rows"):
        read_jsonl(path)


def test_writes_are_atomic(tmp_path):
    out = tmp_path / "rows.jsonl"
    write_jsonl(out, [{"a": 1}])
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("crash mid-write")
    assert not (tmp_path / "model").exists()  # nothing half-written is left to trust
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]
    assert json.loads(out.read_text()) == {"a": 1}


def test_dvc_yaml_outputs_follow_round_paths():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"prepare", *ROUND_STEPS}
    for step in ROUND_STEPS:
        do = stages[step]["do"]
        assert do["cmd"] == f"rlhf {step} ${{key}}"  # one name: module, stage, command
        outs = do.get("outs", []) + do.get("metrics", [])
        declared = [o.replace("${key}", "r07") for o in outs]
        assert declared == [str(getattr(round_paths("r07"), out)) for out in STEP_OUTPUT[step]]
    sft = round_paths("r00")
    assert stages["prepare"]["outs"] == [str(sft.base), str(sft.policy), str(sft.eval_samples), str(sft.landscape)]
    assert stages["prepare"]["metrics"] == [str(sft.metrics)]


def test_shipped_data_is_what_make_data_writes(tmp_path):
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "data", tmp_path / "data", ignore=shutil.ignore_patterns("rounds"))
    subprocess.run([sys.executable, tmp_path / "data" / "make_data.py"], check=True)
    for name in (
        "sft.jsonl",
        "pretrain.txt",
        "cotrain.jsonl",
        "heldout.jsonl",
        "prompts/eval.jsonl",
        "prompts/label.jsonl",
        "prompts/policy.jsonl",
    ):
        assert (tmp_path / "data" / name).read_text() == (ROOT / "data" / name).read_text(), name
    evals = {r["prompt"] for r in read_prompts(ROOT / "data/prompts/eval.jsonl")}
    seen = {r["prompt"] for s in ("label", "policy") for r in read_prompts(ROOT / f"data/prompts/{s}.jsonl")}
    assert not evals & seen  # evaluation prompts are held out


@pytest.mark.parametrize("kinds, warned", [("reflink,copy", True), ("copy", True), ("hardlink,symlink,copy", False)])
def test_a_project_whose_dvc_cache_copies_is_warned_once_with_the_fix(tmp_path, monkeypatch, caplog, kinds, warned):
    from rlhf.orchestration.preflight import warn_if_copying

    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(f'[cache]\n    type = "{kinds}"\n')
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="rlhf"):
        warn_if_copying()
    lines = [r.getMessage() for r in caplog.records]
    if warned:
        assert len(lines) == 1 and lines[0].startswith(f".dvc/config: cache.type {kinds} copies every output")
        assert "dvc checkout --relink" in lines[0]
    else:
        assert lines == []
