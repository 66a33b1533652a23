"""params.yaml is validated once; every mistake names its key."""

import pytest
import yaml

from rlhf.core.config import load_config
from rlhf.core.errors import UserError
from tests.conftest import ROOT


def write(tmp_path, change: dict | None = None, drop: tuple = ()):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in (change or {}).items():
        *parents, key = dotted.split(".")
        node = params
        for p in parents:
            node = node[p]
        node[key] = value
    for key in drop:
        params.pop(key)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_shipped_params_load():
    cfg = load_config(ROOT / "params.yaml")
    assert list(cfg.rounds) == ["r01", "r02", "r03"]
    assert cfg.update_policy.method == "dpo" and cfg.runtime.threads == 2


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"train_rm.epoch": 2}, "train_rm.epoch: unknown key"),
        ({"typo_section": {}}, "typo_section: unknown key"),
        ({"generate.k": "four"}, "generate.k: input should be a valid integer"),
        ({"generate.k": 1}, "generate.k: input should be greater than or equal to 2"),
        ({"generate.top_p": 1.5}, "generate.top_p: input should be less than or equal to 1"),
        ({"train_rm.learning_rate": 0}, "train_rm.learning_rate: input should be greater than 0"),
        ({"update_policy.method": "sgd"}, "update_policy.method: input should be 'dpo', 'ppo', 'rest' or 'rloo'"),
        ({"policy": {"method": "ppo"}}, "policy: unknown key (did you mean update_policy?)"),
        ({"update_policy.ppo.gama": 1}, "update_policy.ppo.gama: unknown key (did you mean update_policy.ppo.gamma?)"),
        ({"update_policy.k": 1}, "update_policy.k: dpo needs at least 2 samples per prompt (got 1)"),
        (
            {"update_policy.method": "rloo", "update_policy.k": 3},
            "update_policy.batch_size: rloo needs a multiple of k=3",
        ),
        ({"update_policy.init": "liti", "update_policy.lora.rank": 8}, "update_policy.init: liti interpolates full"),
        ({"update_policy.init": "warm"}, "update_policy.init: input should be 'sft', 'last' or 'liti'"),
        ({"update_policy.eta": 1.5}, "update_policy.eta: input should be less than or equal to 1"),
        ({"update_policy.ref": "base"}, "update_policy.ref: input should be 'sft' or 'init'"),
        ({"update_policy.rest.thresholds": [0.8, 0.5]}, "update_policy.rest.thresholds: must be a non-empty rising"),
        ({"update_policy.lora.dropout": 1.0}, "update_policy.lora.dropout: input should be less than 1"),
        (
            {"label.judge.type": "python", "label.judge.name": "score"},
            "label.judge.name: a python judge is module:function",
        ),
        (
            {"label.judge.type": "hf", "label.judge.name": "./no/rm"},
            "label.judge.name: no such model directory: ./no/rm",
        ),
        ({"label.judge.template": "Q: {prompt}"}, "label.judge.template: needs both {prompt} and {response}"),
        ({"label.noise": 0.7}, "label.noise: input should be less than or equal to 0.5"),
        ({"label.pairs": "some"}, "label.pairs: input should be 'best_worst' or 'all_pairs'"),
        ({"train_rm.objective": "hinge"}, "train_rm.objective: input should be 'bt', 'bt_margin', 'absolute' or"),
        ({"update_policy.reward": "ensemble"}, "update_policy.reward: input should be 'last', 'ensemble_mean'"),
        ({"rounds": {}}, "rounds: needs at least one round"),
        ({"rounds": {"r01": "r00", "r03": "r02"}}, "rounds: entry 2 must be 'r02: r01'"),
        ({"prepare.policy": "./no/such/model"}, "prepare.policy: no such model directory: ./no/such/model"),
        ({"generate.max_new_tokens": 500}, "update_policy.max_length: must exceed generate.max_new_tokens"),
    ],
)
def test_bad_params_name_the_key(tmp_path, change, expected):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, change))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_rounds_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="rounds: required key is missing"):
        load_config(write(tmp_path, drop=("rounds",)))
    bad = tmp_path / "params.yaml"
    bad.write_text("runtime:\n  seed: [1,\n")
    with pytest.raises(UserError, match=r"params.yaml:\d+: not valid YAML"):
        load_config(bad)


def test_hub_ids_are_not_checked_offline(tmp_path):
    cfg = load_config(write(tmp_path, {"prepare.policy": "EleutherAI/pythia-70m-deduped"}))
    assert cfg.prepare.policy == "EleutherAI/pythia-70m-deduped"


def test_every_key_is_described_once_in_the_schema_and_docs_params_md_is_generated_from_it():
    from rlhf.core import reference

    undescribed = [k.name for k in reference.keys() if not k.description]
    assert undescribed == []
    assert (ROOT / "docs" / "params.md").read_text() == reference.markdown()


def test_a_rejected_value_names_what_its_key_is_for_and_what_it_takes(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train_rm"]["data"] = "al"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as e:
        load_config(tmp_path / "params.yaml")
    assert str(e.value) == (
        f"{tmp_path / 'params.yaml'}: train_rm.data: input should be 'last', 'concat' or 'sample' "
        "(got 'al') — which rounds' pairs: this one's, all so far, or an equal share of each "
        "round's (last | concat | sample)"
    )


def test_rlhf_params_prints_one_key_or_a_section(tmp_path):
    import subprocess

    from tests.conftest import BIN

    out = subprocess.run(
        [BIN / "rlhf", "params", "update_policy.ppo.target_kl"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0
    assert out.stdout.split(None, 1) == [
        "update_policy.ppo.target_kl",
        "per-sequence KL an adaptive controller steers "
        "toward; null: fixed kl_coef (number or null > 0; default null)\n",
    ]
    section = subprocess.run([BIN / "rlhf", "params", "train_rm"], cwd=tmp_path, capture_output=True, text=True)
    assert [line.split()[0] for line in section.stdout.splitlines()][:3] == [
        "train_rm",
        "train_rm.init",
        "train_rm.objective",
    ]
    bad = subprocess.run([BIN / "rlhf", "params", "train_rm.dta"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr == "error: params: no key 'train_rm.dta' (`rlhf params` lists them all)\n"
