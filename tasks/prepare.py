"""prepare: round 0. Builds (or takes) the base LM and the SFT policy, then evaluates the SFT policy.

With `prepare.policy: tiny` (the offline default) it builds a word-level tokenizer and a tiny Llama
from the shipped data, pre-trains it briefly on plain text (the base, also an RM init) and fine-tunes
it with SFT, completion-only loss, into the round-0 policy. With a path or hub id it copies that SFT
policy into round 0 (base and policy alike).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from rlhf.core.config import Config
from rlhf.core.errors import UserError
from rlhf.core.io import read_jsonl, read_prompts
from rlhf.core.paths import SFT
from rlhf.core.ranks import is_main

log = logging.getLogger("rlhf")


PARAMS = ("runtime", "prepare", "evaluate", "label.judge", "prompts.max_prompt_length", "prompts.too_long")


def reads(cfg: Config, rnd: str = "r00") -> list[str]:
    """The SFT policy it copies, or the texts it builds the tiny one from; then what evaluate@r00 reads."""
    from tasks.evaluate import reads as evaluate_reads

    p, local = cfg.prepare, Path(cfg.prepare.policy).expanduser()
    if p.policy == "tiny":
        built = [p.pretrain, p.sft, cfg.prompts.label, cfg.prompts.policy]
    else:  # a hub id is no file DVC can hash
        built = [str(local)] if local.is_dir() else []
    return [*built, *(r for r in evaluate_reads(cfg, "r00") if r != str(SFT.policy))]


def prepare(cfg: Config) -> dict:
    from rlhf.ml import models
    from tasks.evaluate import evaluate

    seed = models.setup(cfg, "prepare", "r00")
    if cfg.prepare.policy == "tiny":
        _build_tiny(cfg, seed)
    else:
        tok = models.load_tokenizer(cfg.prepare.policy)
        policy = models.load_policy(cfg.prepare.policy, models.device(cfg))
        models.save(policy, tok, SFT.base)
        models.save(policy, tok, SFT.policy)
    if not is_main():  # a rank of a several-process launch: evaluation is inference, rank 0's alone
        return {}
    return evaluate(cfg, "r00")


def _build_tiny(cfg: Config, seed: int) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rlhf.ml import models

    p = cfg.prepare
    sft = read_jsonl(p.sft, required=("prompt", "completion"))
    try:
        text = open(p.pretrain, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        raise UserError(f"{p.pretrain}: no such file (prepare.pretrain)") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{p.pretrain}: not valid UTF-8 (byte {e.start})") from None
    prompts = [r["prompt"] for f in (cfg.prompts.label, cfg.prompts.policy, cfg.prompts.eval) for r in read_prompts(f)]
    tok = models.build_tokenizer(text + prompts + [r["prompt"] + r["completion"] for r in sft])
    model = models.build_tiny_lm(tok, p.tiny)

    def fit(data: Dataset, epochs: float, lr: float, **kw) -> float:
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
            return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok).train().training_loss

    if p.tiny.pretrain_epochs > 0:
        loss = fit(
            Dataset.from_dict({"text": [t for t in text if t.strip()]}), p.tiny.pretrain_epochs, p.tiny.learning_rate
        )
        log.info("pre-trained the base LM: loss %.3f", loss)
    models.save(model, tok, SFT.base)
    if p.sft_epochs > 0:
        data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in sft])
        loss = fit(data, p.sft_epochs, p.learning_rate, completion_only_loss=True)
        log.info("fine-tuned the SFT policy: loss %.3f", loss)
    models.save(model, tok, SFT.policy)
