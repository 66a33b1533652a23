"""Bad input, caught early and clearly: each case gives a one-line message naming the key, file or line, a
non-zero exit and no traceback, and leaves every completed round's artifacts as they were; afterwards a
clean run still succeeds.

The project is the tiny one after a full round (r01), its gold judge a Python callable kept in the
project (`project_judge:score`, the rubric) so that judge-output cases can change what it returns. Cases
that only a running step can catch add a round r02, whose steps fail; r00 and r01 must stay intact. The
judge's module is a dep of every stage that scores with it, the first being prepare's evaluation of r00.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, write_stages

JUDGE = (
    "from rlhf.judges import PinkElephantJudge\n\n_RUBRIC = PinkElephantJudge('data/world.json')\n\n\n"
    "def score(prompts, responses):\n    return {body}\n"
)
RUBRIC = "_RUBRIC.score(prompts, responses)"


def rlhf(*args, cwd):
    return subprocess.run([BIN / "rlhf", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory):
    dest = tmp_path_factory.mktemp("bad-input") / "project"
    shutil.copytree(tiny_project, dest, symlinks=True)
    (dest / "project_judge.py").write_text(JUDGE.format(body=RUBRIC))
    set_params(dest, lambda p: p["label"].update(judge={"type": "python", "name": "project_judge:score", "best": 1.0}))
    write_stages(dest)
    subprocess.run([BIN / "dvc", "commit", "-f", "-q"], cwd=dest, check=True)  # record the round as DVC's
    return dest


def set_params(project: Path, change) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    change(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def edit(path: str, text: str | bytes | None = None, line: tuple[int, str] | None = None):
    """A change to one project file: new content (None: delete it), or one line replaced (1-based)."""

    def apply(project: Path):
        target = project / path
        if line:
            lines = target.read_text().splitlines(keepends=True)
            lines[line[0] - 1] = line[1] + "\n"
            target.write_text("".join(lines))
        elif text is None:
            target.unlink()
        else:
            target.write_bytes(text if isinstance(text, bytes) else text.encode())

    return apply


def params(**changes):
    """Set dotted keys in params.yaml (a value of `...` deletes the key)."""

    def apply(project: Path):
        def change(p):
            for key, value in changes.items():
                *parents, last = key.split("__")
                node = p
                for k in parents:
                    node = node.setdefault(k, {})
                node.pop(last) if value is ... else node.__setitem__(last, value)

        set_params(project, change)

    return apply


def judge_returns(body: str):
    """The project's judge returns `body` instead, and a round r02 runs it (its label step fails)."""

    def apply(project: Path):
        (project / "project_judge.py").write_text(JUDGE.format(body=body))
        params(rounds={"r01": "r00", "r02": "r01"})(project)

    return apply


def model_folder(kind: str):
    """A model folder the judge or prepare.policy is pointed at, built from the tiny SFT policy."""

    def apply(project: Path):
        folder = project / "models" / kind
        shutil.copytree(project / "data/rounds/r00/policy", folder)
        config = json.loads((folder / "config.json").read_text())
        if kind.startswith("remote"):
            config["auto_map"] = {"AutoModelForSequenceClassification": "modeling.Custom"}
            (folder / "modeling.py").write_text("raise SystemExit('remote code ran')\n")
        if kind.startswith("pickled"):
            config["architectures"] = ["LlamaForSequenceClassification"]
            (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
        if kind == "nopad":
            tc = json.loads((folder / "tokenizer_config.json").read_text())
            for key in ("pad_token", "eos_token"):
                tc.pop(key, None)
            (folder / "tokenizer_config.json").write_text(json.dumps(tc))
            tok = json.loads((folder / "tokenizer.json").read_text())
            tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in ("<pad>", "<eos>")]
            (folder / "tokenizer.json").write_text(json.dumps(tok))
            params(prepare__policy=f"./models/{kind}")(project)
            return
        (folder / "config.json").write_text(json.dumps(config))
        if kind.endswith("-policy"):
            params(prepare__policy=f"./models/{kind}")(project)
            return
        kind_type = "ultrarm" if kind == "causal-as-ultrarm" else "hf"
        params(label__judge={"type": kind_type, "name": f"./models/{kind}"})(project)

    return apply


CASES = {
    # params
    "unknown key": (params(runtime__sede=1), "params.yaml: runtime.sede: unknown key (did you mean runtime.seed?)"),
    "wrong type": (params(generate__k="eight"), "params.yaml: generate.k: input should be a valid integer"),
    "out of range": (params(label__noise=0.7), "params.yaml: label.noise: input should be less than or equal to 0.5"),
    "negative learning rate": (
        params(train_rm__learning_rate=-1),
        "params.yaml: train_rm.learning_rate: input should be greater than 0",
    ),
    "unknown method": (
        params(update_policy__method="sac"),
        "params.yaml: update_policy.method: input should be 'dpo', 'ppo'",
    ),
    "dpo with one sample": (
        params(update_policy__k=1),
        "params.yaml: update_policy.k: dpo needs at least 2 samples per prompt",
    ),
    "liti with lora": (
        params(update_policy__init="liti", update_policy__lora={"rank": 4}),
        "params.yaml: update_policy.init: liti interpolates full weights",
    ),
    "responses longer than the update's max length": (
        params(generate__max_new_tokens=500),
        "params.yaml: update_policy.max_length: must exceed generate.max_new_tokens",
    ),
    "rounds out of order": (
        params(rounds={"r01": "r00", "r03": "r02"}),
        "params.yaml: rounds: entry 2 must be 'r02: r01'",
    ),
    "falling rest thresholds": (
        params(update_policy__rest={"thresholds": [0.9, 0.5]}),
        "params.yaml: update_policy.rest.thresholds: must be a non-empty rising list",
    ),
    "landscape template": (
        params(evaluate__landscape={"template": "{opener}", "axes": {"opener": ["a"], "topic": ["b"]}}),
        "params.yaml: evaluate.landscape.template: must name exactly the axes",
    ),
    "not yaml": (edit("params.yaml", "runtime:\n  seed: [1,\n"), "params.yaml:3: not valid YAML"),
    "no params file": (edit("params.yaml", None), "params.yaml: no such file"),
    # data
    "missing prompt file": (params(prompts__eval="data/prompts/nope.jsonl"), "data/prompts/nope.jsonl: no such file"),
    "empty prompt file": (edit("data/prompts/label.jsonl", ""), "data/prompts/label.jsonl: no rows"),
    "malformed jsonl line": (
        edit("data/prompts/policy.jsonl", line=(3, '{"id": "x", "prompt": ')),
        "data/prompts/policy.jsonl:3: malformed JSON",
    ),
    "missing field": (
        edit("data/prompts/eval.jsonl", line=(5, '{"id": "e5"}')),
        "data/prompts/eval.jsonl:5: missing field 'prompt'",
    ),
    "invalid utf-8": (
        edit("data/prompts/label.jsonl", b'{"id": "a", "prompt": "caf\xe9"}\n'),
        "data/prompts/label.jsonl: not valid UTF-8 (byte 26)",
    ),
    "duplicate ids": (
        edit("data/prompts/eval.jsonl", '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n'),
        "data/prompts/eval.jsonl: row 2: duplicate id 'a' (first in row 1)",
    ),
    "empty prompt": (
        edit("data/prompts/eval.jsonl", '{"id": "a", "prompt": " "}\n'),
        "data/prompts/eval.jsonl: row 1: the prompt is empty",
    ),
    "malformed sft data": (edit("data/sft.jsonl", line=(2, "not json")), "data/sft.jsonl:2: malformed JSON"),
    "missing pretraining text": (edit("data/pretrain.txt", None), "data/pretrain.txt: no such file (prepare.pretrain)"),
    "malformed world file": (edit("data/world.json", '{"topics": '), "data/world.json: not a valid world file"),
    "co-training rows without completions": (
        lambda p: (edit("data/cotrain.jsonl", '{"prompt": "a"}\n')(p), params(update_policy__cotrain={"ratio": 4})(p)),
        "data/cotrain.jsonl:1: missing field 'completion'",
    ),
    # models
    "missing policy path": (
        params(prepare__policy="./models/missing-sft"),
        "params.yaml: prepare.policy: no such model directory: ./models/missing-sft",
    ),
    "missing judge path": (
        params(label__judge={"type": "hf", "name": "./models/missing-rm"}),
        "params.yaml: label.judge.name: no such model directory: ./models/missing-rm",
    ),
    "a causal LM as the judge": (
        model_folder("causal"),
        "label.judge.name: ./models/causal is a LlamaForCausalLM, not a sequence-classification reward model",
    ),
    "a causal LM as UltraRM": (
        model_folder("causal-as-ultrarm"),
        "label.judge.type: ultrarm needs a Llama reward model with a regression_head",
    ),
    "remote code not trusted": (
        model_folder("remote"),
        "label.judge: ./models/remote needs its own remote code to load; set label.judge.trust_remote_code: true",
    ),
    "pickle-only weights": (model_folder("pickled"), "label.judge: ./models/pickled has only pickle weights"),
    "policy that needs remote code": (
        model_folder("remote-policy"),
        "prepare.policy: ./models/remote-policy needs its own remote code to load; this project never runs it",
    ),
    "policy with pickle weights": (
        model_folder("pickled-policy"),
        "prepare.policy: ./models/pickled-policy has only pickle weights",
    ),
    "tokenizer without pad or eos": (
        model_folder("nopad"),
        "./models/nopad: tokenizer has neither a pad nor an eos token",
    ),
    "judge that does not import": (
        params(label__judge={"type": "python", "name": "no_such_module:score"}),
        "label.judge.name: cannot import no_such_module:score",
    ),
    # judge output, caught by the first step that scores with the changed judge: prepare's evaluation of r00
    "judge returns nan": (
        judge_returns("[float('nan') if i == 2 else 0.5 * i for i in range(len(responses))]"),
        "error: label.judge.name: project_judge:score returned nan for response 3",
    ),
    "judge returns infinity": (
        judge_returns("[float('inf')] * len(responses)"),
        "error: label.judge.name: project_judge:score returned inf for response 1",
    ),
    "judge raises": (
        judge_returns("1 / 0"),
        "error: label.judge.name: project_judge:score raised ZeroDivisionError: division by zero",
    ),
    "judge returns strings": (
        judge_returns("['0.5'] * len(responses)"),
        "error: label.judge.name: project_judge:score returned str '0.5' for response 1; a judge returns one number",
    ),
    "judge scores all alike": (
        judge_returns("[0.5] * len(responses)"),
        "stage label@r01 failed: data/rounds/r01/samples.jsonl: no preference pair: the judge gave every finished "
        "sample of each prompt the same score",
    ),
    "judge returns too few scores": (
        judge_returns("[0.5]"),
        "error: label.judge.name: project_judge:score returned 1 scores for 6 responses",
    ),
    # prompt sets too small for the params
    "too few label prompts": (
        edit("data/prompts/label.jsonl", "".join(f'{{"id": "l{i}", "prompt": "say {i} ."}}\n' for i in range(3))),
        "error: prompts.label: data/prompts/label.jsonl has 3 prompts; a train_rm batch of 16 pairs (label.pairs: "
        "best_worst) needs 16",
    ),
    "one eval prompt": (
        edit("data/prompts/eval.jsonl", '{"id": "e", "prompt": "say nothing ."}\n'),
        "error: prompts.eval: data/prompts/eval.jsonl has 1 prompts; evaluate's statistics needs 2",
    ),
}


RESCORES_R00 = {"judge scores all alike"}


# First, so that DVC's run-cache has no generate@r02 to restore instead of running it. The disk fills in
# generate's JSONL write, or (room for the samples and labels, not the model) in train_rm's model save. Outputs are
# copied into DVC's cache here (`cache.type: copy`, local to the project), as on a disk shared with the cache: on a
# small file system of its own they would be symlinks into the cache, taking no room on it.
@pytest.mark.parametrize("stage, written", [("generate", "samples.jsonl"), ("train_rm", "reward_model")])
def test_a_full_disk_fails_the_step_that_writes_and_names_its_file(project, stage, written):
    r01, r02 = project / "data" / "rounds" / "r01", project / "data" / "rounds" / "r02"
    room = (
        8
        if stage == "generate"
        else int(1.4 * sum((r01 / f).stat().st_size for f in ("samples.jsonl", "labels.jsonl")) / 1024)
    )
    subprocess.run([BIN / "dvc", "config", "--local", "cache.type", "copy"], cwd=project, check=True)
    shutil.rmtree(r02, ignore_errors=True)
    r02.mkdir(parents=True)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={room}k", "tmpfs", str(r02)], capture_output=True
    ).returncode:
        shutil.rmtree(r02)
        pytest.skip("a full disk is simulated with a tiny tmpfs, which needs root to mount")
    saved = (project / "params.yaml").read_bytes()
    before = digest(project / "data" / "rounds" / "r01")
    try:
        params(rounds={"r01": "r00", "r02": "r01"})(project)
        out = rlhf("run", cwd=project)
    finally:
        subprocess.run(["umount", str(r02)], check=True)
        (project / "params.yaml").write_bytes(saved)
        (project / ".dvc" / "config.local").unlink()
        shutil.rmtree(r02, ignore_errors=True)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert last == f"error: stage {stage}@r02 failed: data/rounds/r02/{written}: cannot write (No space left on device)"
    assert digest(project / "data" / "rounds" / "r01") == before


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_culprit_and_loses_nothing(project, case):
    change, expected = CASES[case]
    # a judge that now ties everything lets r00 be scored anew (its gold changed, rightly); its models stay
    r00 = [project / "data/rounds/r00" / d for d in (("base", "policy") if case in RESCORES_R00 else ("",))]
    before = digest(project / "data" / "rounds" / "r01"), [digest(d) for d in r00]
    saved = {
        p: p.read_bytes()
        for p in [
            project / "params.yaml",
            project / "project_judge.py",
            *(project / "data").glob("*.*"),
            *(project / "data/prompts").glob("*"),
        ]
    }
    try:
        change(project)
        out = rlhf("run", cwd=project)
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
        shutil.rmtree(project / "models", ignore_errors=True)
    last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
    assert out.returncode == 2, out.stderr[-2000:]
    assert last.startswith("error: ") and expected in last, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert (digest(project / "data" / "rounds" / "r01"), [digest(d) for d in r00]) == before


def test_after_the_bad_inputs_a_clean_run_succeeds(project):
    out = rlhf("run", cwd=project)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "round   gold" in out.stdout + out.stderr
