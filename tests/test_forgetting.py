"""What the policy forgets (issue 19, item 4): held-out text NLL against the SFT policy's, the conversation checks,
lm_eval tasks on local data; and the forgetting numbers and the fitted peaks in the round and study reports."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from rlhf.core.config import TinyModel
from rlhf.core.errors import UserError
from rlhf.core.paths import SFT, round_paths
from rlhf.evaluation import forgetting, harness
from rlhf.ml import models, nll
from tests.conftest import ROOT

ROWS = [  # (context, text): plain text rows and prompt/completion rows of different lengths
    ("", "user : tell me about the ocean . assistant : the ocean is deep ."),
    ("user : describe the forest . assistant :", " the forest is quiet . i like the old oak ."),
    ("", "the moon is bright ."),
    ("user : say something . assistant :", " i like the happy song ."),
    ("user : talk about the city now . assistant :", " the busy street looks nice today . we saw a bus and a train ."),
]


@pytest.fixture(scope="module")
def tiny_lm():
    """A randomly initialised word-level Llama of a few thousand parameters (no training: NLL is NLL)."""
    tok = models.build_tokenizer([c + t for c, t in ROWS])
    torch.manual_seed(0)
    model = models.build_tiny_lm(tok, TinyModel(hidden_size=32, layers=1, heads=2, intermediate_size=64))
    return model.eval(), tok


def direct_nll(model, tok, context: str, text: str, eos: bool = True, limit: int = 10**6) -> tuple[float, int]:
    """One sequence, one token at a time: -sum log p(token t | tokens < t) over the text (and its eos), the
    sequence cut to `limit` tokens; and how many tokens that scored."""
    ids = (tok(context + text)["input_ids"] + [tok.eos_token_id] * eos)[:limit]
    start = max(len(tok(context)["input_ids"]), 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return -sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids))), len(ids) - start


# --- the pieces, on hand-made rows --------------------------------------------------------------------


def test_batched_nll_equals_a_direct_per_sequence_computation(tiny_lm):
    model, tok = tiny_lm
    contexts, texts = zip(*ROWS)
    total, count = nll.token_nll(model, tok, list(contexts), list(texts), max_length=64, batch_size=2)
    expected = [direct_nll(model, tok, c, t) for c, t in ROWS]
    assert total == pytest.approx([e[0] for e in expected], rel=1e-5)
    assert count.tolist() == [e[1] for e in expected]
    assert count[0] == len(tok(ROWS[0][1])["input_ids"])  # plain text: every token but the first, and the eos
    cut, n = nll.token_nll(model, tok, [""], [ROWS[0][1]], max_length=4)  # cut to 4 tokens: 3 scored
    assert (cut[0], n[0]) == (pytest.approx(direct_nll(model, tok, "", ROWS[0][1], limit=4)[0], rel=1e-5), 3)


def test_encode_scores_from_the_first_token_a_bos_precedes():
    class WithBos:  # a tokenizer that adds a BOS (1), as Llama's do
        eos_token_id = 2

        def __call__(self, texts):
            return {"input_ids": [[1, *(ord(c) for c in t)] for t in texts]}

    ids, starts = nll.encode(WithBos(), ["", "ab"], ["xy", "c"], max_length=100)
    assert ids == [[1, 120, 121, 2], [1, 97, 98, 99, 2]] and starts == [1, 3]


def test_nll_summary_weights_by_tokens_and_reports_sources_apart():
    out = forgetting.nll_summary(np.array([2.0, 4.0, 6.0]), np.array([1.0, 1.0, 1.0]), np.array([1, 2, 3]), list("abb"))
    assert out["nll"] == pytest.approx(2.0) and out["sft_nll"] == pytest.approx(0.5)
    assert out["delta_nll"] == pytest.approx(1.5) and out["ppl"] == pytest.approx(math.exp(2))
    assert out["tokens"] == 6 and out["rows"] == 3
    assert out["sources"]["a"]["nll"] == pytest.approx(2.0) and out["sources"]["b"]["sft_nll"] == pytest.approx(0.4)
    assert "sources" not in forgetting.nll_summary(np.ones(2), np.ones(2), np.ones(2, int), ["x", "x"])
    assert forgetting.nll_summary(np.ones(1), np.ones(1), np.zeros(1, int), ["x"])["mean"] is None  # nothing scored


def test_conversational_rubric_asks_for_an_ended_non_empty_unrepetitive_answer():
    responses = [" the ocean is deep .", "", " a b c d a b c d a b c d", " the moon is bright ."]
    checks = forgetting.conversational(responses, [True, True, True, False])
    assert checks["ended"].tolist() == [True, True, True, False]
    assert checks["non_empty"].tolist() == [True, False, True, True]
    assert checks["repetition"][2] == pytest.approx(1 - 4 / 9)  # 9 word 4-grams, 4 distinct: seq-rep-4 0.56
    assert checks["conversational"].tolist() == [True, False, False, False]
    assert forgetting.seq_rep("a a a".split()) == 0 and forgetting.seq_rep("a a a a a".split()) == 0.5


def test_heldout_rows_need_text_or_a_prompt_and_completion(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text('{"text": "the sun ."}\n{"prompt": "q", "answer": "a"}\n')
    with pytest.raises(UserError, match=r"heldout.jsonl:2: needs a non-empty string `text`.*\(evaluate.heldout\)"):
        nll.read_heldout(str(path))
    rows = nll.read_heldout(str(ROOT / "data" / "heldout.jsonl"))
    assert {r["source"] for r in rows} == {"pretrain", "cotrain"} and len(rows) == 48


def test_shipped_heldout_text_is_trained_on_by_no_step():
    trained = set((ROOT / "data" / "pretrain.txt").read_text().splitlines())
    for name in ("sft.jsonl", "cotrain.jsonl"):
        rows = [json.loads(line) for line in (ROOT / "data" / name).read_text().splitlines()]
        trained |= {r["prompt"] + r["completion"] for r in rows}
    rows = nll.read_heldout(str(ROOT / "data" / "heldout.jsonl"))
    assert not {r["context"] + r["text"] for r in rows} & trained


def test_lm_eval_not_installed_is_one_line_naming_the_key(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(UserError, match=r"^evaluate.lm_eval: needs the lm-evaluation-harness.*pip install"):
        harness.require()


def test_preflight_reads_the_heldout_text_and_checks_and_names_a_missing_task_file(tmp_path):
    from rlhf.core.config import Config
    from rlhf.orchestration.preflight import check_forgetting

    def cfg(**evaluate):
        return Config.model_validate({"rounds": {"r01": "r00"}, "evaluate": evaluate})

    check_forgetting(cfg(heldout=str(ROOT / "data/heldout.jsonl"), conversation_checks=None))
    with pytest.raises(UserError, match=r"no\.jsonl: no such file \(evaluate\.heldout\)"):
        check_forgetting(cfg(heldout=str(tmp_path / "no.jsonl")))
    with pytest.raises(UserError, match=r"no\.jsonl: no such file \(evaluate\.conversation_checks\)"):
        check_forgetting(cfg(heldout=None, conversation_checks=str(tmp_path / "no.jsonl")))
    with pytest.raises(UserError, match=r"^evaluate\.lm_eval: tasks/mine\.yaml: no such task file$"):
        check_forgetting(cfg(heldout=None, conversation_checks=None, lm_eval=["tasks/mine.yaml"]))


def test_lm_eval_runs_a_task_defined_on_local_data_on_the_policy_in_memory(tiny_lm, tmp_path, monkeypatch):
    """A multiple-choice task on a local JSONL file, offline: lm_eval's accuracy is the share of questions whose
    right answer the model itself gives the highest log-likelihood."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = tiny_lm
    docs = [
        {"question": "the ocean is", "choices": ["deep .", "bright ."], "label": 0},
        {"question": "i like the", "choices": ["old oak .", "happy song ."], "label": 1},
        {"question": "we saw a", "choices": ["bus and a train .", "moon ."], "label": 0},
    ]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = tmp_path / "tiny_local.yaml"
    task.write_text(
        "task: tiny_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    out = harness.run([str(task)], model, tok, limit=None, seed=0)
    # lm_eval scores " " + choice after the question, without an eos
    right = [
        max(range(2), key=lambda i: -direct_nll(model, tok, d["question"], " " + d["choices"][i], eos=False)[0])
        == d["label"]
        for d in docs
    ]
    assert set(out) == {"tiny_local"} and out["tiny_local"]["acc"] == pytest.approx(np.mean(right))
    assert "acc_stderr" in out["tiny_local"]
    with pytest.raises(UserError, match=r"^evaluate.lm_eval: .*no_such_task"):
        harness.run([str(task), "no_such_task"], model, tok, limit=None, seed=0)


# --- a round of the tiny project ------------------------------------------------------------------------


def test_each_round_measures_heldout_nll_against_sft_and_the_conversation_checks(tiny_project, monkeypatch):
    """The fixture's prepare and round 1 (a DPO update, no co-training): r00 is the SFT policy, so its Δ is 0 and
    its NLL is round 1's SFT NLL; round 1's NLL is that of its policy, computed one sequence at a time here."""
    monkeypatch.chdir(tiny_project)
    r00, r01 = (json.loads(round_paths(r).metrics.read_text()) for r in ("r00", "r01"))
    f0, f1 = r00["forgetting"], r01["forgetting"]
    assert f0["delta_nll"] == 0 and f1["sft_nll"] == f0["nll"] and f1["tokens"] == f0["tokens"] > 500
    assert set(f1["sources"]) == {"pretrain", "cotrain"} and f1["ppl"] == pytest.approx(math.exp(f1["nll"]))
    tok, policy = models.load_tokenizer(round_paths("r01").policy), models.load_policy(round_paths("r01").policy)
    rows = nll.read_heldout("data/heldout.jsonl")
    direct = [direct_nll(policy, tok, r["context"], r["text"]) for r in rows]
    assert f1["nll"] == pytest.approx(sum(x for x, _ in direct) / sum(n for _, n in direct), rel=1e-5)
    assert f1["delta_nll"] > 0  # the update moved the policy off its priors' text
    for m in (r00, r01):
        c = m["conversation"]
        assert c["checks"] == 12 and c["samples"] == 24 and len(c["examples"]) == 12
        assert all(0 <= c[k] <= 1 for k in ("conversational", "ended", "non_empty", "gold"))


@pytest.fixture(scope="module")
def forget_project(tiny_project, tmp_path_factory):
    dest = tmp_path_factory.mktemp("forget") / "project"
    shutil.copytree(tiny_project, dest)
    return dest


def test_a_big_learning_rate_forgets_more_and_co_training_keeps_the_nll_lower(forget_project, monkeypatch):
    from tasks.update_policy import update_policy
    from tests.test_update_policy import config

    monkeypatch.chdir(forget_project)
    before = json.loads(round_paths("r01").metrics.read_text())["forgetting"]["delta_nll"]
    delta = {}
    for ratio in (0, 1):
        cfg = config({"update_policy": {"dpo": {"learning_rate": 0.01}, "cotrain": {"ratio": ratio}}})
        update_policy(cfg, "r01")
        tok = models.load_tokenizer(round_paths("r01").policy)
        policy, sft = models.load_policy(round_paths("r01").policy), models.load_policy(SFT.policy)
        delta[ratio] = forgetting.heldout(cfg, tok, policy, sft)["delta_nll"]
    assert delta[0] > 2 * before > 0  # 10x the learning rate: far more forgotten (measured: 1.8 vs 0.10)
    assert delta[1] < 0.75 * delta[0]  # one co-training batch per update batch keeps it lower (measured: 0.8)
