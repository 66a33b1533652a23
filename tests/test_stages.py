"""dvc.yaml is generated from params.yaml and the code: each stage lists exactly the project files its step
imports and the round outputs it reads, so `dvc status` marks exactly the stages a change touches.

The DVC tests use stand-in round outputs recorded with `dvc commit`: what is checked is DVC's bookkeeping
of deps, which does not look inside the files."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf.core.config import load_config
from rlhf.core.paths import STEPS
from rlhf.orchestration import imports, stages
from tests.conftest import BIN, ROOT, deep_update, make_project, write_stages


def test_the_shipped_dvc_yaml_is_what_rlhf_stages_writes(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert yaml.safe_load((ROOT / "dvc.yaml").read_text()) == yaml.safe_load(stages.render(load_config()))


@pytest.mark.parametrize("step", STEPS)
def test_a_stage_lists_every_project_module_its_step_loads(step):
    """An independent look: the project modules Python has loaded after importing the step (module-level
    imports; the lazy ones inside functions are read from the source by the same analysis) are all deps."""
    code = (
        f"import json, sys; import tasks.{step}; "
        "print(json.dumps(sorted(getattr(m, '__file__', None) or '' for m in list(sys.modules.values()))))"
    )
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    )
    ours = {
        p.relative_to(ROOT).as_posix()
        for f in loaded
        if f and any((p := Path(f)).is_relative_to(ROOT / package) for package in imports.PACKAGES)
    }
    ours = {f for f in ours if not imports._docstring_only(ROOT / f)}
    deps = set(stages.code_deps()[step])
    assert ours <= deps, f"{step}: loaded but not a dep: {sorted(ours - deps)}"
    assert f"tasks/{step}.py" in deps and "rlhf/cli.py" not in deps


def expanded(project) -> dict[str, list[str]]:
    """Each stage of the project's dvc.yaml, foreach items expanded: name -> deps + outs."""
    doc = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    out = {"prepare": doc["prepare"]["deps"] + doc["prepare"]["outs"] + doc["prepare"]["metrics"]}
    for step, spec in list(doc.items())[1:]:
        for rnd, item in spec["foreach"].items():
            paths = spec["do"]["deps"] + spec["do"]["outs"] + spec["do"].get("metrics", [])
            reads = item["reads"]
            out[f"{step}@{rnd}"] = [
                re.sub(r"\$\{item\.reads\[(\d+)\]\}", lambda m, reads=reads: reads[int(m[1])], p.replace("${key}", rnd))
                for p in paths
            ]
    return out


def fill(project) -> None:
    """A stand-in for every round output the stages name, then all of it recorded in dvc.lock."""
    for paths in expanded(project).values():
        for rel in paths:
            path = project / rel
            if path.exists():
                continue
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(rel)
            else:
                path.mkdir(parents=True)
                (path / "model.safetensors").write_text(rel)
    dvc(project, "commit", "-f", "-q")


def dvc(project, *args) -> str:
    return subprocess.run([BIN / "dvc", *args], cwd=project, capture_output=True, text=True, check=True).stdout


def changed(project) -> set[str]:
    return set(json.loads(dvc(project, "status", "--json")))


ROUNDS3 = {"rounds": {"r01": "r00", "r02": "r01", "r03": "r02"}}


@pytest.fixture
def project(tmp_path):
    project = make_project(tmp_path / "project", {**ROUNDS3, "train_rm": {"data": "concat"}})
    fill(project)
    assert changed(project) == set()
    return project


def test_editing_a_module_marks_exactly_the_stages_whose_step_imports_it(project):
    pairs = project / "rlhf" / "ml" / "pairs.py"
    pairs.write_text(pairs.read_text() + "\n# changed\n")
    # label makes pairs, train_rm reads them, DPO's update draws them; generate and evaluate never import it
    assert changed(project) == {f"{s}@r0{i}" for s in ("label", "train_rm", "update_policy") for i in (1, 2, 3)}


def test_where_vllm_is_installed_changes_no_stage_and_the_backend_every_sampling_one(project):
    def set_generate(change):
        params = yaml.safe_load((project / "params.yaml").read_text())
        (project / "params.yaml").write_text(yaml.safe_dump(deep_update(params, {"generate": change})))

    set_generate({"vllm_python": "/opt/vllm/bin/python", "vllm_memory": 0.3})
    assert changed(project) == set()
    set_generate({"backend": "vllm"})
    stages = {f"{s}@r0{i}" for s in ("generate", "update_policy", "evaluate") for i in (1, 2, 3)}
    assert changed(project) == {"prepare", *stages}  # prepare evaluates round 0


def test_a_changed_round_marks_the_later_stages_that_read_it(project):
    (project / "data/rounds/r01/labels.jsonl").write_text("relabelled")
    # label@r01's output changed; concat: each round's RM trains on all labels so far
    assert changed(project) == {"label@r01", "train_rm@r01", "train_rm@r02", "train_rm@r03"}


def test_with_last_data_a_round_reads_its_own_labels_alone(tmp_path):
    project = make_project(tmp_path / "project", {**ROUNDS3, "update_policy": {"reward": "ensemble_mean"}})
    fill(project)
    (project / "data/rounds/r01/labels.jsonl").write_text("relabelled")
    assert changed(project) == {"label@r01", "train_rm@r01"}
    (project / "data/rounds/r01/reward_model/model.safetensors").write_text("retrained")
    # an ensemble of every round's RM: each later policy update and evaluation reads round 1's
    assert changed(project) == {
        "label@r01",
        "train_rm@r01",
        *(f"{s}@r0{i}" for s in ("update_policy", "evaluate") for i in (1, 2, 3)),
    }


def test_liti_reads_every_earlier_policy(tmp_path):
    project = make_project(tmp_path / "project", {**ROUNDS3, "update_policy": {"init": "liti", "ref": "init"}})
    fill(project)
    (project / "data/rounds/r01/policy/model.safetensors").write_text("other weights")
    # r02 generates from r01's policy and starts from it; r03 interpolates from it; ref: init evaluates against it
    assert changed(project) >= {
        "generate@r02",
        "update_policy@r02",
        "update_policy@r03",
        "evaluate@r02",
        "evaluate@r03",
    }
    assert "generate@r03" not in changed(project)


def test_an_existing_project_upgrades_without_recomputing(project):
    """A project whose dvc.lock names the old flat modules (rlhf/models.py, ...) re-records its rounds as
    docs/reliability.md says: `rlhf stages`, then `dvc commit -f`; no output changes."""
    lock = project / "dvc.lock"
    outs = {k: v.get("outs") for k, v in yaml.safe_load(lock.read_text())["stages"].items()}
    lock.write_text(lock.read_text().replace("rlhf/ml/models.py", "rlhf/models.py"))
    assert "generate@r01" in changed(project)
    subprocess.run([BIN / "rlhf", "stages"], cwd=project, check=True, capture_output=True)
    dvc(project, "commit", "-f", "-q")
    assert changed(project) == set()
    assert {k: v.get("outs") for k, v in yaml.safe_load(lock.read_text())["stages"].items()} == outs


def test_a_stage_run_by_hand_under_a_stale_dvc_yaml_stops_in_one_line(project):
    params = project / "params.yaml"
    params.write_text(
        yaml.safe_dump(deep_update(yaml.safe_load(params.read_text()), {"train_rm": {"data": "last"}}), sort_keys=False)
    )
    check = subprocess.run([BIN / "rlhf", "check"], cwd=project, capture_output=True, text=True)
    assert check.returncode == 0 and "dvc.yaml is out of date" in check.stdout
    out = subprocess.run(
        [BIN / "dvc", "repro", "--single-item", "train_rm@r02"], cwd=project, capture_output=True, text=True
    )
    assert out.returncode != 0 and "Traceback" not in out.stdout + out.stderr
    assert (
        "error: dvc.yaml: out of date with params.yaml or the code; run `rlhf stages` to regenerate it, then "
        "`dvc repro` (`rlhf run` does both)"
    ) in out.stdout + out.stderr
    write_stages(project)
    assert (
        "dvc.yaml is out of date"
        not in subprocess.run([BIN / "rlhf", "check"], cwd=project, capture_output=True, text=True).stdout
    )


def test_each_output_is_on_disk_once_linked_from_the_cache(project):
    """cache.type (rlhf/core/paths.py's CACHE_LINKS, in a clone's .dvc/config and every workspace's): the round
    outputs DVC recorded are hard links to its cache on this file system, not second copies."""
    from rlhf.core.paths import CACHE_LINKS

    assert f'type = "{CACHE_LINKS}"' in (ROOT / ".dvc" / "config").read_text()
    files = [p for p in (project / "data" / "rounds").rglob("*") if p.is_file()]
    assert files and all(p.stat().st_nlink == 2 for p in files)
    cached = {(p.stat().st_dev, p.stat().st_ino) for p in (project / ".dvc" / "cache").rglob("*") if p.is_file()}
    assert {(p.stat().st_dev, p.stat().st_ino) for p in files} <= cached
