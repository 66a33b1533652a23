"""Sharded training saves what it trained (runtime.accelerate_config): under DeepSpeed ZeRO-3 and FSDP each rank
holds a shard of every weight, so the ranks gather the weights through accelerate before rank 0 saves, and the
reward model's forward passes after training go through the engine. Run here on 2 CPU ranks over gloo:
DeepSpeed's own CPU accelerator, and FSDP2 with accelerate's GPU-only gate opened for the test's ranks (without
that, accelerate trains an FSDP config unsharded on CPU, which the project refuses). What needs GPUs is in
docs/scaling.md."""

import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf.core.config import load_config, parse_config
from rlhf.core.errors import UserError
from rlhf.core.paths import SFT, round_paths
from rlhf.core.processes import free_port
from rlhf.core.seeds import stage_seed
from rlhf.ml import models
from tests.conftest import TINY, make_project
from tests.test_scale import build_round0_and_samples, rlhf, set_params

NEEDS_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")

# Every weight of the tiny model partitioned: ZeRO-3 keeps weights under 100k elements whole by default.
ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}

# Test only: accelerate sets FSDP up only beside a GPU (on CPU ranks it quietly trains unsharded, as DDP). This
# opens that gate in the ranks, so that accelerate's FSDP2 path (fully_shard, its get_state_dict) runs for real
# over gloo; everything else is the project's code and the libraries' as they are.
FSDP_ON_CPU = """
import os
if "LOCAL_RANK" in os.environ:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _init = AcceleratorState.__init__

    def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kw):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kw)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = _fsdp_on_cpu
"""


def accelerate_file(folder, kind: str, gather: bool = True) -> str:
    """An accelerate config file as `accelerate config` writes one: DeepSpeed ZeRO-3 (`gather`: its weights
    gathered for saving) or FSDP2 (FULL_SHARD)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"compute_environment": "LOCAL_MACHINE", "num_machines": 1, "main_process_port": free_port()}
    if kind == "zero3":
        zero = {**ZERO3["zero_optimization"], "stage3_gather_16bit_weights_on_model_save": gather}
        (folder / "zero3.json").write_text(json.dumps({**ZERO3, "zero_optimization": zero}))
        spec |= {
            "distributed_type": "DEEPSPEED",
            "deepspeed_config": {"deepspeed_config_file": str(folder / "zero3.json")},
        }
    else:
        spec |= {
            "distributed_type": "FSDP",
            "fsdp_config": {
                "fsdp_version": 2,
                "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "fsdp_state_dict_type": "SHARDED_STATE_DICT",  # what a save gathers whichever is set
                "fsdp_reshard_after_forward": True,
            },
        }
    path = folder / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The tiny project's round 0 (an untrained tiny Llama) and round 1's samples, labelled by the rubric."""
    from tasks.label import label

    project = make_project(tmp_path_factory.mktemp("sharded") / "project", {**TINY, "runtime": {"threads": 1}})
    build_round0_and_samples(project)
    old = os.getcwd()
    os.chdir(project)
    try:
        label(load_config(), "r01")
    finally:
        os.chdir(old)
    set_params(project, {"train_rm": {"data": "sample", "sample_size": 64, "batch_size": 16}})
    return project


def run_step(project, step: str, kind: str | None, tmp_path) -> dict:
    """`rlhf <step> r01` on 2 ranks, plain (DDP) or under `kind`'s accelerate config; the step's summary."""
    env = None
    if kind == "fsdp":
        (tmp_path / "gate").mkdir(exist_ok=True)
        (tmp_path / "gate" / "sitecustomize.py").write_text(FSDP_ON_CPU)
        env = {"PYTHONPATH": str(tmp_path / "gate")}
    config = accelerate_file(tmp_path, kind) if kind else None
    set_params(project, {"runtime": {"num_processes": 2, "accelerate_config": config}})
    out = rlhf(project, step, "r01", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"')]
    assert len(summary) == 1 and summary[0]["processes"] == 2, out.stdout[-2000:]
    return summary[0]


def weights(folder) -> dict:
    return load_file(next(folder.glob("*.safetensors")))


_DDP: dict = {}  # DDP's run of a step, kept while the step's input model is unchanged (both kinds compare with it)


def ddp_run(project, step: str, folders: dict, tmp_path) -> tuple[dict, dict]:
    """The weights in `folders` and the summary of `step` on 2 plain (DDP) ranks."""
    given = project / (SFT.policy if step == "train_rm" else round_paths("r01").reward_model)
    key = (step, hashlib.sha256((given / "model.safetensors").read_bytes()).hexdigest())
    if key not in _DDP:
        summary = run_step(project, step, None, tmp_path)
        _DDP[key] = ({name: weights(folder) for name, folder in folders.items()}, summary)
    return _DDP[key]


def assert_same_training(sharded: dict, ddp: dict, start: dict, what: str) -> None:
    """Every weight whole (DDP's keys and shapes), moved by training from `start` (those it has), and DDP's up to
    float rounding."""
    assert sharded.keys() == ddp.keys()
    assert all(sharded[k].shape == ddp[k].shape for k in ddp)
    moved = max(float((sharded[k] - start[k]).abs().max()) for k in sharded if k in start)
    diff = max(float((sharded[k] - ddp[k]).abs().max()) for k in ddp)
    print(f"{what}: moved {moved:.2e}, differs from DDP by {diff:.2e}")
    assert moved > 1e-3 and diff < moved / 100, (what, diff, moved)


def accuracy_of_the_saved_rm(project, monkeypatch) -> float:
    """The saved RM loaded whole in this process, scored on the pairs the step trained on (its seed's sample)."""
    from rlhf.ml.sampling import reward_scores
    from tasks.train_rm import rm_pairs

    monkeypatch.chdir(project)
    cfg = load_config()
    pairs = rm_pairs(cfg, "r01", stage_seed(cfg, "train_rm", "r01"))
    path = round_paths("r01").reward_model
    rm, tok = models.load_reward_model(path), models.load_tokenizer(path)
    prompts = [p["prompt"] for p in pairs]
    chosen = reward_scores(rm, tok, prompts, [p["chosen"] for p in pairs])
    return float(np.mean(chosen - reward_scores(rm, tok, prompts, [p["rejected"] for p in pairs]) > 0))


SHARDED = [pytest.param("zero3", marks=NEEDS_DEEPSPEED), "fsdp"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", SHARDED)
def test_sharded_train_rm_saves_the_full_trained_weights(project, tmp_path, monkeypatch, kind):
    """2 ranks under ZeRO-3 (or FSDP2) save the reward model 2 DDP ranks train, whole: every weight at its full
    shape, moved by training, equal to DDP's up to float rounding (the same global batches; measured: 5e-6 under
    ZeRO-3, 1e-7 under FSDP2, against 6e-3 of training); and the summary's accuracy, scored through the engine while
    the weights were still sharded, is that of the saved model loaded whole."""
    rm = project / round_paths("r01").reward_model
    ddp, _ = ddp_run(project, "train_rm", {"rm": rm}, tmp_path)
    summary = run_step(project, "train_rm", kind, tmp_path)
    assert_same_training(weights(rm), ddp["rm"], weights(project / SFT.policy), f"{kind} train_rm")
    assert summary["train_accuracy"] == accuracy_of_the_saved_rm(project, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("kind", SHARDED)
def test_sharded_dpo_saves_the_trained_lora_adapter_and_its_checkpoint(project, tmp_path, kind):
    """DPO with LoRA (the reference prepared by TRL for the engine, the checkpoint saved from inside training):
    the adapter and the intermediate one are DDP's, whole (measured: 2e-7 apart under ZeRO-3, equal under FSDP2,
    against 4e-3 of training); the trainable parameters are counted in full."""
    set_params(project, {"update_policy": {"method": "dpo", "lora": {"rank": 4}}, "evaluate": {"checkpoints": 1}})
    paths = round_paths("r01")
    if not (project / paths.reward_model).is_dir():
        run_step(project, "train_rm", None, tmp_path)
    folders = {"policy": project / paths.policy, "checkpoint": project / paths.checkpoint(1)}
    ddp, ddp_summary = ddp_run(project, "update_policy", folders, tmp_path)
    summary = run_step(project, "update_policy", kind, tmp_path)
    for name, folder in folders.items():
        start = {k: torch.zeros_like(w) for k, w in ddp[name].items() if "lora_B" in k}  # LoRA's B starts at 0
        assert_same_training(weights(folder), ddp[name], start, f"{kind} dpo {name}")
    assert summary["trainable_parameters"] == ddp_summary["trainable_parameters"] > 0


@pytest.mark.slow
@NEEDS_DEEPSPEED
def test_prepare_under_zero3_saves_base_and_policy_whole_and_evaluates_them(tmp_path):
    """Two trainers on one model in one step (pre-training, then SFT), each saving through its engine, then
    rank 0 alone evaluates round 0, loading models whole although the step set ZeRO-3 up: DDP's weights up to
    float rounding (measured: 2e-6, against weights of order 1)."""
    project = make_project(tmp_path / "project", {**TINY, "runtime": {"threads": 1}})
    saved = {}
    for kind in (None, "zero3"):
        config = accelerate_file(tmp_path, kind) if kind else None
        set_params(project, {"runtime": {"num_processes": 2, "accelerate_config": config}})
        (project / SFT.metrics).unlink(missing_ok=True)
        out = rlhf(project, "prepare")
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout.splitlines()[-1])["processes"] == 2 and (project / SFT.metrics).is_file()
        saved[kind] = {name: weights(project / folder) for name, folder in (("base", SFT.base), ("policy", SFT.policy))}
    for name, ddp in saved[None].items():
        sharded = saved["zero3"][name]
        assert sharded.keys() == ddp.keys() and all(sharded[k].shape == ddp[k].shape for k in ddp)
        assert max(float((sharded[k] - ddp[k]).abs().max()) for k in ddp) < 1e-4, name


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, message",
    [
        (
            "fsdp",  # accelerate would train each rank unsharded: the step says so instead of quietly running DDP
            "FSDP needs GPUs: accelerate would train each rank unsharded here (MULTI_CPU); use a DeepSpeed config "
            "(DeepSpeed runs on CPU ranks) or none",
        ),
        pytest.param(
            "zero3",  # without the flag ZeRO-3 cannot gather the weights for saving: refused before training
            "ZeRO-3 gathers its sharded weights for saving only with zero3_save_16bit_model: true "
            "(stage3_gather_16bit_weights_on_model_save in a DeepSpeed JSON)",
            marks=NEEDS_DEEPSPEED,
        ),
    ],
)
def test_a_sharded_config_that_cannot_save_what_it_trains_is_refused_in_one_line(project, tmp_path, kind, message):
    config = accelerate_file(tmp_path, kind, gather=False)
    set_params(project, {"runtime": {"num_processes": 2, "accelerate_config": config}})
    out = rlhf(project, "train_rm", "r01")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"error: runtime.accelerate_config: {message}"


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"update_policy": {"method": "ppo"}},
            "runtime.accelerate_config: ppo (the project's own loop) does not run under accelerate, so FSDP "
            "would not shard it",
        ),
        (
            {"update_policy": {"method": "rest"}},
            "update_policy.rest.thresholds: under FSDP (runtime.accelerate_config) an improve step cannot",
        ),
    ],
)
def test_what_a_sharded_config_cannot_do_is_refused_naming_the_key(tmp_path, change, message):
    cfg = {"rounds": {"r01": "r00"}, "runtime": {"accelerate_config": accelerate_file(tmp_path, "fsdp")}}
    with pytest.raises(UserError, match="^params.yaml: " + message.replace("(", r"\(").replace(")", r"\)")):
        parse_config({**cfg, **change}, "params.yaml")
    parse_config({**cfg, "update_policy": {"method": "dpo"}}, "params.yaml")  # one trainer, once: fine
