"""Every key optional, for real: the keys a params.yaml leaves out are written in at their defaults, the file's
comments and order kept, so that DVC (which checks params in the file) runs every stage and tracks every value."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from rlhf.core import defaults
from rlhf.core.config import Config, load_config
from tests.conftest import BIN, make_project

SPARSE = """\
# my study's base
rounds:   # one round
  r01: r00

prompts:
  label: data/prompts/label.jsonl     # sampled and judged
  policy: data/prompts/policy.jsonl
  eval: data/prompts/eval.jsonl

update_policy:
  dpo:
    beta: 0.3   # stronger
"""


def test_the_left_out_keys_are_written_at_their_defaults_keeping_the_files_own_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(SPARSE)
    added = defaults.complete(path)
    assert "prompts.max_prompt_length" in added and "prompts.too_long" in added and "runtime" in added
    assert "update_policy.dpo.epochs" in added and "update_policy.method" in added
    text = path.read_text()
    for line in SPARSE.splitlines():  # every line of the user's, comments and layout included, is still there
        assert line in text.splitlines(), line
    assert text.index("  eval: data/prompts/eval.jsonl\n  max_prompt_length: 1024\n  too_long: drop\n")
    assert text.index("runtime:") < text.index("rounds:") < text.index("prompts:") < text.index("update_policy:")
    written = yaml.safe_load(text)
    want = Config.model_validate(yaml.safe_load(SPARSE)).model_dump(mode="json")
    want["prompts"] |= {k: v["path"] for k, v in want["prompts"].items() if isinstance(v, dict)}  # kept as paths
    assert written == want  # every key, each the schema's default where the file had none
    assert load_config(path).update_policy.dpo.beta == 0.3
    assert defaults.complete(path) == [] and path.read_text() == text  # once complete, never rewritten


def test_the_notice_names_the_keys_in_one_line():
    line = defaults.notice([f"k{i}" for i in range(9)])
    assert line.startswith("params.yaml: wrote 9 keys") and line.endswith("k5 and 3 more") and "\n" not in line


def test_the_shipped_params_yaml_leaves_nothing_out():
    """`make demo` then writes nothing into it: a fresh clone's params.yaml stays as committed."""
    from tests.conftest import ROOT

    assert defaults.missing(yaml.safe_load((ROOT / "params.yaml").read_text()), load_config(ROOT / "params.yaml")) == []


@pytest.mark.parametrize(
    "params",
    [{"rounds": {"r01": "r00"}}, yaml.safe_load(SPARSE)],
    ids=["only rounds", "prompts naming the three sets"],
)
def test_dvc_runs_every_stage_of_a_sparse_params_yaml_after_rlhf_stages(tmp_path, params):
    """Before, DVC refused such a project at its first stage naming the parameters missing from params.yaml;
    `rlhf check` says what `rlhf stages` (or `rlhf run`) will write, and then every stage's params are there."""
    project = make_project(tmp_path / "p")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def run(*cmd):
        return subprocess.run(cmd, cwd=project, capture_output=True, text=True)

    check = run(BIN / "rlhf", "check")
    assert check.returncode == 0, check.stderr
    assert "keys left out, whose defaults `rlhf run` or `rlhf stages` writes into it" in check.stdout
    stages = run(BIN / "rlhf", "stages")
    assert stages.returncode == 0 and "params.yaml: wrote" in stages.stdout, stages.stderr
    assert "keys left out" not in run(BIN / "rlhf", "check").stdout
    status = run(BIN / "dvc", "status")
    assert status.returncode == 0 and "missing" not in status.stdout + status.stderr, status.stdout + status.stderr
    for stage in ("prepare", "generate@r01", "train_rm@r01", "update_policy@r01", "evaluate@r01"):
        assert f"{stage}:" in status.stdout  # each one will run


def test_dvc_reruns_exactly_the_stages_a_changed_default_changes(tmp_path):
    """A value the file left out is in it now: changing it is a change DVC sees, in the stages that list it
    (prompts.too_long: prepare lists all of `prompts`; generate, update_policy and evaluate the key)."""
    from tests.test_stages import changed, fill

    project = make_project(tmp_path / "p")
    (project / "params.yaml").write_text(yaml.safe_dump({"rounds": {"r01": "r00", "r02": "r01"}}))
    subprocess.run([BIN / "rlhf", "stages"], cwd=project, check=True, capture_output=True)
    fill(project)
    assert changed(project) == set()
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("  too_long: drop", "  too_long: truncate"))
    assert changed(project) == {
        "prepare",
        *(f"{s}@{r}" for s in ("generate", "update_policy", "evaluate") for r in ("r01", "r02")),
    }


def test_dvc_exp_run_set_param_reruns_the_stages_that_list_it(tmp_path):
    """DVC's own experiments (docs/commands.md): `dvc exp run -S key=value` edits params.yaml and reruns what
    the value changes; a key the user never wrote is in the file, so it can be set too."""
    from tests.test_stages import fill

    project = make_project(tmp_path / "p", {"rounds": {"r01": "r00", "r02": "r01"}})
    subprocess.run([BIN / "rlhf", "stages"], cwd=project, check=True, capture_output=True)
    fill(project)
    subprocess.run([BIN / "dvc", "config", "--unset", "core.no_scm"], cwd=project, check=True)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "rounds"]):
        subprocess.run([*git, *cmd], cwd=project, check=True, capture_output=True)
    out = subprocess.run(
        [BIN / "dvc", "exp", "run", "--dry", "-S", "update_policy.dpo.beta=0.3"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    ran = {line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"update_policy@r01", "update_policy@r02"}
