"""The pink-elephant rubric on hand-made answers."""

import pytest

from rlhf.judges import PinkElephantJudge
from tests.conftest import ROOT

PROMPT = "user : tell me about the ocean please . assistant :"


@pytest.fixture(scope="module")
def judge():
    return PinkElephantJudge(ROOT / "data" / "world.json")


def score(judge, response, prompt=PROMPT):
    return float(judge.score([prompt], [response])[0])


def test_best_answer_scores_best(judge):
    assert score(judge, "the ocean is deep . i like the blue fish .") == pytest.approx(judge.best)


def test_each_fault_costs_its_weight(judge):
    good = "the ocean is deep . i like the blue fish ."
    assert score(judge, good.replace("i like the blue fish", "i saw a pink elephant today")) == pytest.approx(0.6)
    assert score(judge, "the ocean is deep . the tree is green .") == pytest.approx(0.8)  # half off topic
    assert score(judge, "the ocean is deep .") == pytest.approx(0.9)  # one sentence: half the length credit
    six = " ".join(["the ocean is deep ."] * 6)
    assert score(judge, six) == pytest.approx(0.8)  # too long


def test_gibberish_and_empty_earn_little(judge):
    assert score(judge, "") == 0.0
    assert score(judge, "ocean ocean fish whale") < 0.35  # topic words, but no sentence
    assert score(judge, "the ocean is deep . blorp zzz the fish .") < score(
        judge, "the ocean is deep .  the fish is blue ."
    )


def test_topic_comes_from_the_prompt(judge):
    answer = "the tree is green . the owl is old ."
    assert score(judge, answer, "user : describe the forest . assistant :") == pytest.approx(1.0)
    assert score(judge, answer) == pytest.approx(0.6)


def test_batch_matches_single(judge):
    answers = ["the ocean is deep .", "", "the pink elephant is big ."]
    batch = judge.score([PROMPT] * 3, answers)
    assert batch.tolist() == [score(judge, a) for a in answers]
