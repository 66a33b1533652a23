"""Model loading and saving, the locally built tiny models, and the per-stage runtime setup.

Everything loads through `from_pretrained(path_or_hub_id)`, the tiny default included, so the code
path is the one a hub model takes. Weights load from safetensors; remote code stays off.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

from rlhf.core.config import Config, TinyModel, missing_local_dir
from rlhf.core.errors import UserError
from rlhf.core.io import atomic_dir
from rlhf.core.ranks import is_main
from rlhf.core.seeds import stage_seed
from rlhf.ml import logits

log = logging.getLogger("rlhf")
LOGS = "logs"  # training curves (runtime.report_to: tensorboard), ignored by git and DVC
_RUN_NAME = "rlhf"  # the stage's round and step, set by setup(): each trainer's run name
SPECIALS = {"pad": "<pad>", "eos": "<eos>", "unk": "<unk>"}
# The tiny policy's chat template: a user turn renders as `user : <question> assistant :`, the dialogue form
# its pre-training and SFT texts use, and an answer ends with <eos>; so the default run renders its prompts
# through a template as a Hub instruct model's run does.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def setup(cfg: Config, step: str, rnd: str) -> int:
    """Fix threads and seeds for one stage run, and name its training curves; returns the stage's seed."""
    import numpy as np
    import torch

    global _RUN_NAME
    _RUN_NAME = f"{rnd}-{step}"
    # transformers' TensorBoard callback reads its folder here: one per round and step, under the project's logs/.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(LOGS, _RUN_NAME).absolute())
    torch.set_num_threads(cfg.runtime.threads)
    logits.set_budget(cfg.runtime.logits_mb)
    seed = stage_seed(cfg, step, rnd)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def device(cfg: Config) -> str:
    """cpu or cuda; a rank of a several-process launch (rlhf/orchestration/launch.py) gets its own GPU,
    cuda:LOCAL_RANK."""
    import torch

    if cfg.runtime.device == "cuda" and not torch.cuda.is_available():
        raise UserError("runtime.device: cuda asked for, but no GPU is visible")
    if cfg.runtime.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda"


def _existing(path: str | Path, what: str) -> str:
    if missing_local_dir(str(path)):
        raise UserError(f"{path}: no such {what} directory")
    return str(Path(path).expanduser()) if Path(path).expanduser().is_dir() else str(path)


def check_local_model(path: str, section: str, trust_remote_code: bool = False, allow_pickle: bool = False) -> dict:
    """Checks of a local model folder that load no weights, before the first step runs: a readable
    config.json, no remote code unless trusted, no pickle-only weights (.bin/.pt can run code when
    loaded) unless allowed. `section` is the params key that names the model. Returns the config ({} for
    a hub id, which is checked as it loads)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return {}
    key = section if section.endswith((".policy", ".base")) else f"{section}.name"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{key}: {folder}/config.json: not a Hugging Face model folder ({e})") from None
    flags = not section.endswith((".policy", ".base"))  # policies load with remote code and pickle always off
    if "auto_map" in config and not trust_remote_code:
        raise UserError(
            f"{section}: {path} needs its own remote code to load; "
            + (
                f"set {section}.trust_remote_code: true if you trust it"
                if flags
                else "this project never runs it for a policy"
            )
        )
    if (
        not allow_pickle
        and not list(folder.glob("*.safetensors"))
        and list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
    ):
        raise UserError(
            f"{section}: {path} has only pickle weights (.bin/.pt), which can run code when loaded; "
            + (f"set {section}.allow_pickle: true to load them anyway" if flags else "convert them to safetensors")
        )
    return config


def load_tokenizer(path: str | Path, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_existing(path, "tokenizer"), trust_remote_code=False)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"{path}: tokenizer has neither a pad nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_policy(path: str | Path, dev: str = "cpu", trainable: bool = False):
    """A causal LM. A folder holding a LoRA adapter loads its base (as recorded in adapter_config.json: a hub id,
    or a path relative to the adapter's folder, as a published round has it, or else to the project) and
    applies it: merged for inference, or as a trainable PeftModel with `trainable=True`."""
    from transformers import AutoModelForCausalLM

    path = _existing(path, "policy")
    if is_adapter(path):
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_policy(adapter_base(path), dev), path, is_trainable=trainable)
        return model if trainable else model.merge_and_unload()
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
    return model.to(dev)


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str | Path:
    """The base a LoRA adapter folder applies to: a hub id, or a path relative to the adapter's folder (e.g.
    `../base` beside a published round's policy, rlhf publish), or else to the project."""
    base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    return Path(path) / base if (Path(path) / base).is_dir() else base


def load_reward_model(path: str | Path, dev: str = "cpu", num_labels: int | None = None):
    """A sequence-classification RM. Give `num_labels` to start one from a causal LM (a new head); a
    trained RM keeps its own (2 for the `combined` objective)."""
    from transformers import AutoModelForSequenceClassification

    kw = {"num_labels": num_labels} if num_labels else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        _existing(path, "reward model"), use_safetensors=True, trust_remote_code=False, **kw
    )
    return model.to(dev)


def save(model, tok, out: str | Path, meta: dict | None = None, trainer=None) -> None:
    """Save weights (safetensors; a PeftModel saves its adapter only) and tokenizer into `out` atomically;
    `meta`: file name -> JSON-able content written beside them. `trainer`: the trainer that trained `model`.
    Under FSDP or DeepSpeed ZeRO-3 each rank holds only a shard of every weight, so every rank calls this: they
    gather the weights together through the trainer's accelerator (as Trainer.save_model does) and rank 0
    writes the full trained model, not its own shard."""
    state = None
    if trainer is not None and sharded(trainer):
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective: every rank takes part
        if not is_main():
            return
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        tok.save_pretrained(tmp)
        for name, content in (meta or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=1))


def build_tokenizer(texts: list[str]):
    """A word-level tokenizer over the shipped data's words: tiny, and exact for the toy language."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.lower().split()})
    vocab = {tok: i for i, tok in enumerate([SPECIALS["pad"], SPECIALS["eos"], SPECIALS["unk"], *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS["unk"]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIALS["pad"],
        eos_token=SPECIALS["eos"],
        unk_token=SPECIALS["unk"],
        model_max_length=512,
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def build_tiny_lm(tok, spec: TinyModel):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    log.info("built a tiny Llama: %.2fM parameters, vocabulary %d", model.num_parameters() / 1e6, len(tok))
    return model


def train_args(config_cls, cfg: Config, seed: int, scratch: str | Path, **kw):
    """A TRL config with this project's CPU-safe, reproducible defaults; `kw` sets the rest. The batch size
    given is the global one: under a several-process launch each rank takes its share."""
    from rlhf.core.ranks import world_size

    on_cpu = device(cfg) == "cpu"
    # accelerate turns DeepSpeed off for a trainer told to use the CPU; without a GPU DeepSpeed runs on its own CPU
    # accelerator when the ranks meet over gloo instead
    deepspeed_on_cpu = on_cpu and launched_with() == "DEEPSPEED"
    if "per_device_train_batch_size" in kw:
        kw["per_device_train_batch_size"] //= world_size()  # config checks that it divides
    return config_cls(
        output_dir=str(scratch),
        seed=seed,
        data_seed=seed,
        bf16=not on_cpu and _bf16_ok(),
        use_cpu=on_cpu and not deepspeed_on_cpu,
        ddp_backend="gloo" if deepspeed_on_cpu else None,
        dataloader_pin_memory=not deepspeed_on_cpu,  # nothing to pin memory for without a GPU
        activation_checkpointing=cfg.runtime.activation_checkpointing,
        save_strategy="no",
        report_to=cfg.runtime.report_to,
        run_name=_RUN_NAME,
        logging_steps=max(1, kw.pop("logging_steps", 50 if cfg.runtime.report_to == "none" else 5)),
        disable_tqdm=not os.isatty(2),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # several processes: every trained weight takes part in the loss
        **kw,
    )


def _bf16_ok() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# ---- sharded training (runtime.accelerate_config: FSDP or DeepSpeed) -------------------------------------------

# What the launch's accelerate config asks of its ranks: `accelerate launch` sets these from the file.
_LAUNCH_FLAGS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def launched_with() -> str | None:
    """FSDP or DEEPSPEED when this process is a rank of a launch whose accelerate config asks for it, else None."""
    return next((kind for flag, kind in _LAUNCH_FLAGS.items() if os.environ.get(flag, "").lower() == "true"), None)


def load_whole() -> None:
    """Load models whole from here on in this process. Once a trainer is set up under DeepSpeed ZeRO-3,
    transformers partitions every model it loads over the ranks (deepspeed.zero.Init, all of them taking part), as
    the launch's config asks; a rank working alone after training cannot."""
    if launched_with() == "DEEPSPEED":
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def sharded(trainer) -> bool:
    """Whether `trainer` spreads its model's weights over the ranks (FSDP, or DeepSpeed of any ZeRO stage)."""
    return bool(trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)


def engine(trainer, model):
    """What a forward pass of `model` must go through once `trainer` has trained it: under FSDP or ZeRO-3 the
    model as the trainer wrapped it, which gathers each layer's weights as it goes (so every rank must run the
    same passes); otherwise the model itself."""
    return trainer.model_wrapped if sharded(trainer) else model


def trainer(cls, checkpoints=None, span: tuple[float, float] = (0.0, 1.0), **kw):
    """A trainer of the steps: `cls(**kw)`, refused in one line where accelerate would not shard as the launch's
    config asks, and given the saver of `checkpoints` (rlhf/ml/checkpoints.py) over progress `span` of the update;
    the saver gathers each checkpoint through this trainer."""
    logits.size_trl_tiles()  # TRL's fused LM head within runtime.logits_mb
    built = cls(**kw)
    _check_sharding(built)
    if checkpoints is not None and checkpoints.n:
        built.add_callback(checkpoints.callback(built, *span))
    return built


def _check_sharding(built) -> None:
    asked, got = launched_with(), built.accelerator.distributed_type.name
    if asked == "FSDP" and got != asked:
        raise UserError(
            "runtime.accelerate_config: FSDP needs GPUs: accelerate would train each rank unsharded here "
            f"({got}); use a DeepSpeed config (DeepSpeed runs on CPU ranks) or none"
        )
    if asked and got != asked:
        raise UserError(f"runtime.accelerate_config: asks for {asked}, but accelerate set up {got}")
    ds = built.accelerator.state.deepspeed_plugin if got == "DEEPSPEED" else None
    zero = ds.deepspeed_config.get("zero_optimization", {}) if ds else {}
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise UserError(
            "runtime.accelerate_config: ZeRO-3 gathers its sharded weights for saving only with "
            "zero3_save_16bit_model: true (stage3_gather_16bit_weights_on_model_save in a DeepSpeed JSON)"
        )
