"""generate: the current policy samples K responses for each labelling prompt."""

from __future__ import annotations

import logging

from rlhf.core.config import SAMPLING_PARAMS, Config
from rlhf.core.io import write_jsonl
from rlhf.core.paths import SFT, round_paths
from rlhf.core.prompts import describe, messages_of, read_prompts
from rlhf.evaluation.metrics import unfinished

log = logging.getLogger("rlhf")

# What the stage's outputs depend on besides the files below: dvc.yaml is generated from these
# (rlhf/orchestration/stages.py). Not runtime.num_processes: generate is one process however training runs.
PARAMS = (
    "runtime.seed",
    "runtime.threads",
    "runtime.device",
    *SAMPLING_PARAMS,
    "prompts.label",
    "prompts.max_prompt_length",
    "prompts.too_long",
)


def reads(cfg: Config, rnd: str) -> list[str]:
    """The files and folders generate reads: the policy it samples from (a LoRA adapter's base too)."""
    return [str(round_paths(cfg.rounds[rnd]).policy), str(SFT.policy), *cfg.prompts.label.files()]


def generate(cfg: Config, rnd: str) -> dict:
    from rlhf.ml import chat, models
    from rlhf.ml.sampler import Sampler

    seed = models.setup(cfg, "generate", rnd)
    prev = cfg.rounds[rnd]
    policy_dir = round_paths(prev).policy
    tok = models.load_tokenizer(policy_dir)
    prompts, texts, too_long = chat.policy_prompts(
        tok, read_prompts(cfg.prompts.label, "prompts.label"), cfg.prompts, "prompts.label"
    )
    with Sampler(cfg, tok, policy_dir, seed) as sampler:
        s = sampler(texts, cfg.generate.k, cfg.generate)
    params = cfg.generate.model_dump(exclude={"batch_size", "vllm_python"})  # how, not where vLLM is installed
    rows = [
        {
            "prompt_id": prompts[i]["id"],
            "prompt": texts[i],  # as the policy saw it, rendered: what the proxy RM and the KL read
            "messages": messages_of(prompts[i]["prompt"]),  # the conversation: what the gold judge reads
            "response": text,
            "finished": done,
            "policy_round": prev,
            "sampling": params,
        }
        for i, text, done in zip(s.prompt_index, s.responses, s.finished)
    ]
    write_jsonl(round_paths(rnd).samples, rows)
    for alarm in unfinished("generate", sum(s.finished) / len(rows), cfg.generate.max_new_tokens):
        log.warning("generate %s: %s", rnd, alarm)
    summary = {
        "samples": len(rows),
        "prompts": len(prompts),
        "finished": sum(s.finished) / len(rows),
        "prompt_set": describe(cfg.prompts.label),
    }
    return {**summary, f"prompts_{cfg.prompts.too_long}": too_long} if too_long else summary
