"""The reward landscape on hand-made scores, its params, and its place in a round and the report."""

import json

import numpy as np
import pytest

from rlhf.core.config import Landscape
from rlhf.core.paths import round_paths
from rlhf.evaluation import landscape

SPEC = Landscape(
    template="say {tone} things about {topic}",
    axes={"tone": ["calm", "angry"], "topic": ["sea", "city", "sky"]},
    samples=2,
)


def test_prompts_cover_the_grid_row_major():
    assert landscape.prompts(SPEC) == [
        "say calm things about sea",
        "say calm things about city",
        "say calm things about sky",
        "say angry things about sea",
        "say angry things about city",
        "say angry things about sky",
    ]


def test_grid_averages_samples_per_cell_and_disagreements_rank_the_standardised_gap():
    gold = np.array([1, 1, 0.8, 0.8, 0.6, 0.6, 0.2, 0.2, 0.4, 0.4, 0.0, 0.0])
    proxy = np.array([5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 9, 9.0])  # tracks gold except (angry, sky): rated best
    land = landscape.grid(SPEC, gold, proxy, [f"answer {i}" for i in range(12)])
    assert land["gold"] == [[1.0, 0.8, 0.6], [0.2, 0.4, 0.0]] and land["proxy"][1] == [2.0, 1.0, 9.0]
    assert land["responses"] == [["answer 0", "answer 2", "answer 4"], ["answer 6", "answer 8", "answer 10"]]
    worst = landscape.disagreements(json.loads(json.dumps(land)), n=2)  # as read back from landscape.json
    assert (worst[0]["tone"], worst[0]["topic"]) == ("angry", "sky") and worst[0]["gap"] > 0
    assert abs(worst[0]["gap"]) >= abs(worst[1]["gap"])
    assert landscape.disagreements(landscape.grid(SPEC, gold, None, [""] * 12)) == []  # r00: gold only


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"axes": {"tone": ["calm"]}, "template": "{tone}"}, "exactly two axes"),
        ({"axes": {"tone": ["calm", "calm"], "topic": ["sea"]}, "template": "{tone} {topic}"}, "distinct values"),
        ({"axes": {"tone": ["calm"], "topic": ["sea"]}, "template": "{tone} {subject}"}, "must name exactly the axes"),
    ],
)
def test_bad_landscape_params_name_the_key(tmp_path, spec, message):
    import yaml

    from rlhf.core.config import load_config
    from rlhf.core.errors import UserError

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"rounds": {"r01": "r00"}, "evaluate": {"landscape": spec}}))
    with pytest.raises(UserError, match=message) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: evaluate.landscape.") and "\n" not in str(e.value)


def test_each_round_writes_its_landscape_scored_by_gold_and_proxy(in_project):
    spec = in_project.evaluate.landscape
    for rnd, has_proxy in (("r00", False), ("r01", True)):
        land = json.loads(round_paths(rnd).landscape.read_text())
        assert list(land["axes"]) == list(spec.axes) and len(land["gold"]) == len(spec.axes["opener"])
        assert all(0 <= g <= 1 for row in land["gold"] for g in row)
        assert (land["proxy"] is not None) == has_proxy
    # cells whose prompt is a label or policy prompt are marked seen (the shipped sets share a few)
    from rlhf.core.prompts import read_prompts
    from rlhf.evaluation import landscape

    training = {r["prompt"] for key in ("label", "policy") for r in read_prompts(getattr(in_project.prompts, key))}
    seen = json.loads(round_paths("r01").landscape.read_text())["seen"]
    assert [c in training for c in landscape.prompts(spec)] == [x for row in seen for x in row]
    assert any(x for row in seen for x in row)
    # gold differs across cells: the grid is a landscape, not one number repeated
    assert np.std(json.loads(round_paths("r01").landscape.read_text())["gold"]) > 0
