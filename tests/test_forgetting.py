"""What the policy forgets (issue 19, item 4): held-out text NLL against the SFT policy's, the conversation checks,
lm_eval tasks on local data; and the forgetting numbers and the fitted peaks in the round and study reports."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from rlhf.core.config import Config, TinyModel
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
    budget = 2 * 20 * len(tok)  # about two rows a forward pass: several batches, padded
    assert len(nll.batches([len(tok(c + t)["input_ids"]) + 1 for c, t in ROWS], len(tok), budget)) >= 3
    total, count = nll.token_nll(model, tok, list(contexts), list(texts), max_length=64, budget=budget)
    expected = [direct_nll(model, tok, c, t) for c, t in ROWS]
    assert total == pytest.approx([e[0] for e in expected], rel=1e-5)
    assert count.tolist() == [e[1] for e in expected]
    assert count[0] == len(tok(ROWS[0][1])["input_ids"])  # plain text: every token but the first, and the eos
    cut, n = nll.token_nll(model, tok, [""], [ROWS[0][1]], max_length=4)  # cut to 4 tokens: 3 scored
    assert (cut[0], n[0]) == (pytest.approx(direct_nll(model, tok, "", ROWS[0][1], limit=4)[0], rel=1e-5), 3)


def test_batches_fill_the_logits_budget_with_rows_of_similar_length():
    assert nll.batches([5, 3, 9, 3], per_token=10, budget=60) == [[1, 3], [0], [2]]  # 9 x 10 > 60: alone
    assert nll.batches([5, 3, 9, 3], per_token=10, budget=10**6) == [[1, 3, 0, 2]]


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


@pytest.mark.slow  # lm_eval is an extra: `make test-slow` and CI install it
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
    cfg = Config.model_validate(
        {"rounds": {"r01": "r00"}, "evaluate": {"heldout": None, "conversation_checks": None, "lm_eval": [str(task)]}}
    )
    assert forgetting.measure(cfg, "r01", tok, model, model, None, None, None, seed=0) == {"lm_eval": out}


@pytest.mark.slow
def test_an_unknown_lm_eval_task_is_one_line_naming_the_key(tiny_lm):
    """Slow only for lm_eval's indexing of its own thousands of task files (several seconds)."""
    pytest.importorskip("lm_eval")
    model, tok = tiny_lm
    with pytest.raises(UserError, match=r"^evaluate.lm_eval: .*no_such_task"):
        harness.run(["no_such_task"], model, tok, limit=None, seed=0)


# --- the reports, from hand-made metrics ---------------------------------------------------------------


def round_metrics(rnd: str, nll_: float, alpha: float = 0.5, outside: bool = False) -> dict:
    d = [0.3, 0.6, 1.0]
    curve = [
        {"step": i + 1, "fraction": (i + 1) / 3, "gold": 0.4 + x * (alpha - 0.5 * math.log(x)), "proxy": 0.2 + x}
        | {"kl": x * x, "d": x}
        for i, x in enumerate(d)
    ]
    fit = {"alpha": alpha, "beta": 0.5, "d_peak": math.exp(alpha / 0.5 - 1), "value_peak": 0.4 + alpha, "r2": 0.9}
    fit |= {"baseline": 0.4, "d_peak_low": 0.9 * fit["d_peak"], "d_peak_high": 1.1 * fit["d_peak"]}
    fit["peak_where"] = "beyond" if outside else "inside"
    sources = {s: {"nll": nll_, "sft_nll": 1.0, "delta_nll": nll_ - 1.0, "ppl": math.exp(nll_)} for s in ("a", "b")}
    return {
        "round": rnd,
        "gold": {"mean": curve[-1]["gold"], "sem": 0.01, "count": 8, "best": 1.0},
        "length": 5,
        "kl": {"per_sequence": 1.0, "per_token": 0.1, "d": 1.0},
        "proxy": {"mean": 1.2},
        "curve": curve,
        "fits": {"rl_gold": fit},
        "forgetting": {"nll": nll_, "ppl": math.exp(nll_), "sft_nll": 1.0, "sft_ppl": math.e}
        | {"delta_nll": nll_ - 1.0, "tokens": 100, "rows": 4, "sources": sources},
        "conversation": {"checks": 2, "samples": 4, "conversational": 0.75, "ended": 1.0, "repetition": 0.1}
        | {
            "non_empty": 1.0,
            "gold": 0.5,
            "examples": [{"id": "c1", "response": " hi .", "conversational": True, "gold": 0.5}],
        },
        "lm_eval": {"tiny": {"acc": 0.5, "acc_stderr": 0.1}},
    }


def test_round_report_shows_the_forgetting_numbers_per_round(tmp_path):
    from rlhf.evaluation.report import round_markdown, write_report

    for rnd, value in (("r00", 1.0), ("r01", 1.25)):
        folder = round_paths(rnd, tmp_path).root
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(round_metrics(rnd, value)))
    page = write_report(["r00", "r01"], tmp_path / "reports", tmp_path).read_text()
    assert "What the policy forgets" in page and "Held-out text NLL per round" in page
    assert "<td>r01</td><td>1.250</td><td>3.49</td><td>1.000</td><td>+0.250</td><td>+0.250</td>" in page
    assert "<th>tiny acc</th>" in page and "<th>tiny acc_stderr</th>" not in page
    assert "hi .<br><i>conversational, gold 0.50" in page
    csv = (tmp_path / "reports" / "rounds.csv").read_text().splitlines()
    assert csv[0].endswith(",nll,delta_nll,conversational") and csv[2].endswith(",1.25,0.25,0.75")
    summary = round_markdown(round_metrics("r01", 1.25), [])
    assert "- held-out text NLL 1.250 (ppl 3.49), SFT 1.000, Δ +0.250; a Δ +0.250" in summary
    assert "- conversation checks: 75% conversational" in summary and "- lm_eval tiny: acc 0.500" in summary


def test_study_report_has_peak_and_nll_columns_peaks_by_round_and_curves_per_configuration(tmp_path):
    import csv

    import matplotlib.image

    from rlhf.studies.grid import Run, Study, StudySpec
    from rlhf.studies.report import write_report

    spec = StudySpec(axes={"update_policy.cotrain.ratio": [0, 1]}, seeds=[0, 1], rounds=2)
    runs = []
    for ratio in (0, 1):
        for seed in (0, 1):
            folder = tmp_path / "s" / f"ratio={ratio},seed={seed}"
            for k, rnd in enumerate(("r00", "r01", "r02")):
                path = round_paths(rnd, folder).metrics
                path.parent.mkdir(parents=True)
                m = round_metrics(rnd, 1.0 + 0.1 * k * (2 - ratio) + 0.02 * seed, alpha=0.5 + 0.1 * k + 0.1 * ratio)
                m = m if k else {key: m[key] for key in ("round", "gold", "length", "kl", "forgetting")}
                if k == 2 and ratio == 1 and seed == 1:
                    m = round_metrics(rnd, m["forgetting"]["nll"], alpha=0.5 + 0.1 * k + 0.1 * ratio, outside=True)
                    m["alarms"] = ["regression: gold fell below r01's (0.800 -> 0.700, 5.0 standard errors)"]
                    m["alarms"] += ["over-optimisation inside the round from checkpoint 1"]  # not a round made worse
                path.write_text(json.dumps(m))
            params = {"rounds": {"r01": "r00", "r02": "r01"}}
            runs.append(
                Run(
                    f"ratio={ratio},seed={seed}",
                    f"ratio={ratio}",
                    {"update_policy.cotrain.ratio": ratio},
                    seed,
                    params,
                    folder,
                )
            )
    report = write_report(Study(tmp_path / "s.yaml", spec, runs)).read_text()
    rows = {
        line.split(" | ")[1]: line.strip("| ").split(" | ")
        for line in report.splitlines()
        if line.startswith("| 1 ") or line.startswith("| 2 ")
    }
    head = next(line for line in report.splitlines() if line.startswith("| rank"))
    assert head.endswith("| RM acc | peak d | peak gold | NLL (Δ SFT) | conv. |")
    # ratio 1: alpha 0.8 in r02, so peak d exp(0.8 / 0.5 - 1) = 1.822; one seed's fit says its peak lies beyond the
    # d it measured: an extrapolation, left out of the mean
    peak = f"{math.exp(0.6):.3f} [{0.9 * math.exp(0.6):.2f}, {1.1 * math.exp(0.6):.2f}]"  # mean d [mean interval]
    assert rows["1"][-4:] == [f"{peak} (1/2)", "1.200", "1.210 (+0.210)", "75%"]
    assert rows["0"][-4:] == [f"{math.exp(0.4):.3f} [1.34, 1.64]", "1.100", "1.410 (+0.410)", "75%"]
    # peaks by round: the across-round trend
    assert "| ratio=0 | 1.000 at d 1.22 [1.10, 1.34] | 1.100 at d 1.49 [1.34, 1.64] |" in report
    assert "| 2/2 ⚠1 |" in report and "| 2/2 |" in report  # ratio 1: one run's round made things worse
    assert "- ratio=1,seed=1: r02: regression: gold fell below r01's" in report
    assert "![gold against d at every checkpoint" in report
    pixels = matplotlib.image.imread(str(tmp_path / "s" / "report" / "curves.png"))
    assert pixels.shape[0] > 200 and pixels.std() > 0
    with open(tmp_path / "s" / "report" / "runs.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[0]["peak_d"]) == pytest.approx(math.exp(0.4))
    assert [r["alarms"] for r in table] == ["0", "0", "0", "1"]
    assert float(table[3]["delta_nll"]) == pytest.approx(0.22) and float(table[3]["nll"]) == pytest.approx(1.22)


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
    contexts, texts = [r["context"] for r in rows], [r["text"] for r in rows]
    total, count = nll.token_nll(policy, tok, contexts, texts, max_length=1024)
    assert f1["nll"] == pytest.approx(total.sum() / count.sum(), rel=1e-6) and f1["tokens"] == count.sum()
    for i in (0, 1, 2, 24, 25, 26):  # three rows of each source, one token at a time
        assert total[i] == pytest.approx(direct_nll(policy, tok, contexts[i], texts[i])[0], rel=1e-5)
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
    delta, sft = {}, models.load_policy(SFT.policy)
    for ratio in (0, 1):
        cfg = config({"update_policy": {"dpo": {"learning_rate": 0.01}, "cotrain": {"ratio": ratio}}})
        update_policy(cfg, "r01")
        tok, policy = models.load_tokenizer(round_paths("r01").policy), models.load_policy(round_paths("r01").policy)
        delta[ratio] = forgetting.heldout(cfg, tok, policy, sft)["delta_nll"]
    assert delta[0] > 2 * before > 0  # 10x the learning rate: far more forgotten (measured: 1.8 vs 0.10)
    assert delta[1] < 0.75 * delta[0]  # one co-training batch per update batch keeps it lower (measured: 0.8)
