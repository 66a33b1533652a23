"""prepare: round 0. Makes (or takes) the SFT policy, then evaluates it.

With `prepare.policy: tiny` (the default) round 0 is made here by SFT with TRL's SFTTrainer, completion-only
loss, on `prepare.sft` (prompt/completion rows, strings or conversational messages, which the chat template
renders): of `prepare.base`, a base LM you name (its tokenizer given `prepare.chat_template` where it has
none), or, by default, of a word-level tokenizer and tiny Llama built from the shipped data and pre-trained
briefly on plain text (the base, also an RM init). With a path or hub id in `prepare.policy` it copies that
SFT policy into round 0 (base and policy alike).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from rlhf.core.config import TRAINING_RUNTIME, Config
from rlhf.core.errors import UserError
from rlhf.core.io import link_tree, read_jsonl
from rlhf.core.paths import SFT
from rlhf.core.prompts import messages_of, read_prompts
from rlhf.core.ranks import is_main

log = logging.getLogger("rlhf")


PARAMS = (*TRAINING_RUNTIME, "runtime.logits_mb", "prepare", "generate.backend", "evaluate", "label.judge", "prompts")


def reads(cfg: Config, rnd: str = "r00") -> list[str]:
    """The SFT policy it copies, or the texts it builds the tiny one from; then what evaluate@r00 reads."""
    from tasks.evaluate import reads as evaluate_reads

    p = cfg.prepare
    local = Path(p.base or p.policy).expanduser()
    model = [str(local)] if local.is_dir() else []  # a hub id is no file DVC can hash
    if p.policy != "tiny":
        built = model
    elif p.base:
        built = [*model, p.sft]
    else:
        built = [p.pretrain, p.sft, *cfg.prompts.label.files(), *cfg.prompts.policy.files()]
    return [*built, *(r for r in evaluate_reads(cfg, "r00") if r != str(SFT.policy))]


def prepare(cfg: Config) -> dict:
    from rlhf.ml import models
    from tasks.evaluate import evaluate

    seed = models.setup(cfg, "prepare", "r00")
    if cfg.prepare.base:
        _sft_base(cfg, seed)
    elif cfg.prepare.policy == "tiny":
        _build_tiny(cfg, seed)
    else:
        tok = models.load_tokenizer(cfg.prepare.policy)
        policy = models.load_policy(cfg.prepare.policy, models.device(cfg))
        models.save(policy, tok, SFT.policy)
        link_tree(SFT.policy, SFT.base)  # the same model (train_rm.init: base), on disk once
    if not is_main():  # a rank of a several-process launch: evaluation is inference, rank 0's alone
        return {}
    models.load_whole()  # alone: ZeRO-3 would partition each model evaluate loads over ranks that have left
    return evaluate(cfg, "r00")


def _build_tiny(cfg: Config, seed: int) -> None:
    from datasets import Dataset

    from rlhf.ml import models

    p = cfg.prepare
    sft = read_jsonl(p.sft, required=("prompt", "completion"))
    try:
        text = open(p.pretrain, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        raise UserError(f"{p.pretrain}: no such file (prepare.pretrain)") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{p.pretrain}: not valid UTF-8 (byte {e.start})") from None
    prompts = [
        m["content"]
        for key in ("label", "policy", "eval")
        for r in read_prompts(getattr(cfg.prompts, key), f"prompts.{key}")
        for m in messages_of(r["prompt"])
    ]
    answers = [" ".join(m["content"] for m in messages_of(r[k])) for r in sft for k in ("prompt", "completion")]
    if models.launched_with() == "FSDP" and p.tiny.pretrain_epochs and p.sft_epochs:
        raise UserError(
            "prepare.tiny.pretrain_epochs: under FSDP (runtime.accelerate_config) SFT cannot shard again the model "
            "pre-training sharded: set it to 0, use DeepSpeed, or make round 0 without the config"
        )
    tok = models.build_tokenizer(text + prompts + answers)
    model = models.build_tiny_lm(tok, p.tiny)

    if p.tiny.pretrain_epochs > 0:
        data = Dataset.from_dict({"text": [t for t in text if t.strip()]})
        loss = _fit(cfg, seed, model, tok, data, p.tiny.pretrain_epochs, p.tiny.learning_rate, SFT.base)
        log.info("pre-trained the base LM: loss %.3f", loss)
    else:
        models.save(model, tok, SFT.base)
    _sft(cfg, seed, model, tok, sft)


def _sft_base(cfg: Config, seed: int) -> None:
    """SFT of the base LM in prepare.base on prepare.sft into the round-0 policy."""
    from rlhf.ml import chat, models

    p = cfg.prepare
    rows = read_jsonl(p.sft, required=("prompt", "completion"), what="prepare.sft")
    tok = models.load_tokenizer(p.base)
    if p.chat_template:
        tok.chat_template = p.chat_template
    if not isinstance(rows[0]["prompt"], str) and not chat.has_template(tok):
        raise UserError(
            f"prepare.chat_template: {p.sft} is conversational and {p.base} has no chat template; give it one"
        )
    model = models.load_policy(p.base, models.device(cfg))
    models.save(model, tok, SFT.base)
    _sft(cfg, seed, model, tok, rows)


def _sft(cfg: Config, seed: int, model, tok, rows: list[dict]) -> None:
    """Completion-only SFT on prompt/completion rows (TRL renders conversational ones by the template)."""
    from datasets import Dataset

    from rlhf.ml import models

    p = cfg.prepare
    if p.sft_epochs > 0:
        data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        loss = _fit(cfg, seed, model, tok, data, p.sft_epochs, p.learning_rate, SFT.policy, completion_only_loss=True)
        log.info("fine-tuned the SFT policy: loss %.3f", loss)
    else:
        models.save(model, tok, SFT.policy)


def _fit(cfg: Config, seed: int, model, tok, data, epochs: float, lr: float, out: Path, **kw) -> float:
    """Train `model` with TRL's SFTTrainer and save it into `out` through the trainer (which gathers a sharded
    model's weights); returns the training loss."""
    from trl import SFTConfig, SFTTrainer

    from rlhf.ml import models

    p = cfg.prepare
    with tempfile.TemporaryDirectory() as scratch:
        args = models.train_args(
            SFTConfig,
            cfg,
            seed,
            scratch,
            num_train_epochs=epochs,
            learning_rate=lr,
            per_device_train_batch_size=p.batch_size,
            max_length=p.max_length,
            warmup_steps=10,
            **kw,
        )
        trainer = models.trainer(SFTTrainer, model=model, args=args, train_dataset=data, processing_class=tok)
        loss = trainer.train().training_loss
    models.save(model, tok, out, trainer=trainer)
    return loss
