"""generate: the current policy samples K responses for each labelling prompt."""

from __future__ import annotations

from rlhf.config import Config
from rlhf.io import read_prompts, write_jsonl
from rlhf.paths import round_paths


def generate(cfg: Config, rnd: str) -> dict:
    from rlhf import models, sampling

    seed = models.setup(cfg, "generate", rnd)
    prev = cfg.rounds[rnd]
    policy_dir = round_paths(prev).policy
    prompts = read_prompts(cfg.prompts.label)
    tok = models.load_tokenizer(policy_dir)
    texts, k = [p["prompt"] for p in prompts], cfg.generate.k
    if cfg.generate.backend == "vllm":
        s = sampling.generate_vllm(policy_dir, tok, texts, k, cfg.generate, seed)
    else:
        s = sampling.generate(models.load_policy(policy_dir, models.device(cfg)), tok, texts, k, cfg.generate)
    params = cfg.generate.model_dump(exclude={"batch_size"})
    rows = [
        {"prompt_id": prompts[i]["id"], "prompt": prompts[i]["prompt"], "response": text, "finished": done,
         "policy_round": prev, "sampling": params}
        for i, text, done in zip(s.prompt_index, s.responses, s.finished)
    ]
    write_jsonl(round_paths(rnd).samples, rows)
    return {"samples": len(rows), "prompts": len(prompts), "finished": sum(s.finished) / len(rows)}
