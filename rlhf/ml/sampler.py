"""Every sampling of a round goes through one Sampler, so `generate.backend` serves them all: generate,
each method's rollouts, evaluate and the landscape (most of a round's tokens are the rollouts').

`transformers` samples the model in memory (rlhf/ml/sampling.py). `vllm` loads the policy folder once, on
the GPU beside the model being trained (`generate.vllm_memory` of its memory), and when it samples a model
that is being trained, first loads that model's current weights into the engine, as TRL's colocated vLLM
does; a LoRA policy is sampled with its adapter merged. Either way the result is the same `Samples`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rlhf.core.config import Config, Sampling
from rlhf.core.errors import UserError
from rlhf.ml.chat import saved_generation_config, stop_ids
from rlhf.ml.sampling import Samples, continuations, first_stop, generate

log = logging.getLogger("rlhf")


class Sampler:
    """k responses per rendered prompt from the policy saved in `policy_dir`, or from `model`, that policy in
    memory (a method trains it: vLLM takes its current weights before each sampling; transformers samples it).
    `seed`: the stage's; seed torch before the transformers backend samples, vLLM seeds each prompt."""

    def __init__(self, cfg: Config, tok, policy_dir: str | Path, seed: int, model=None):
        self.cfg, self.tok, self.dir, self.seed, self.model = cfg, tok, Path(policy_dir), seed, model
        self.llm, self.lora, self.calls = None, None, 0

    def __call__(self, prompts: list[str], k: int, s: Sampling, max_new_tokens: int | None = None) -> Samples:
        if self.cfg.generate.backend == "transformers":
            if self.model is None:
                from rlhf.ml.models import device, load_policy

                self.model = load_policy(self.dir, device(self.cfg))
            return generate(self.model, self.tok, prompts, k, s, max_new_tokens)
        if self.llm is None:
            self._start(merged=self.model is not None)
        if self.model is not None:
            self._load_weights(self.model)
        self.calls += 1  # each call its own seeds: a method's rollouts differ from one iteration to the next
        return self._vllm(prompts, k, s, max_new_tokens or s.max_new_tokens)

    def _start(self, merged: bool) -> None:
        """The engine for the policy folder; a LoRA adapter runs over its base, as an adapter when the folder
        is sampled as saved, else merged (the trained model's weights replace the base's)."""
        require_vllm()
        from vllm import LLM

        engine = {"model": str(self.dir)}
        adapter = self.dir / "adapter_config.json"
        if adapter.is_file():
            a = json.loads(adapter.read_text())
            engine["model"] = a["base_model_name_or_path"]
            if not merged:
                from vllm.lora.request import LoRARequest

                rank = next(r for r in (8, 16, 32, 64, 128, 256, 512) if r >= a["r"])  # the ranks vLLM accepts
                engine |= {"enable_lora": True, "max_lora_rank": rank}
                self.lora = LoRARequest("policy", 1, str(self.dir))
        self.llm = LLM(
            **engine,
            tokenizer=str(self.dir),
            seed=self.seed,
            gpu_memory_utilization=self.cfg.generate.vllm_memory,
            trust_remote_code=False,
        )

    def _load_weights(self, model) -> None:
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        for name, weight in merged_weights(model):
            runner.model.load_weights([(name, weight)])
        self.llm.reset_prefix_cache()

    def _vllm(self, prompts: list[str], k: int, s: Sampling, max_new_tokens: int) -> Samples:
        from vllm import SamplingParams

        stops = stop_ids(self.tok, saved_generation_config(self.dir))
        prompt_ids = self.tok(prompts)["input_ids"]  # tokenised as the transformers backend does
        base = self.seed + 1_000_003 * self.calls
        params = [
            SamplingParams(
                n=k,
                seed=base + i,  # per prompt: its samples do not depend on how vLLM batches
                temperature=s.temperature,
                top_k=s.top_k or -1,
                top_p=s.top_p,
                max_tokens=max_new_tokens,
                stop_token_ids=stops,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, lora_request=self.lora)
        out = Samples([], [], [], [])
        for i, request in enumerate(outputs):  # in the order of the prompts
            for c in request.outputs:
                ids, done = list(c.token_ids), c.finish_reason == "stop"
                end = first_stop(ids, stops)
                if end is not None:
                    ids = ids[: end + 1]
                elif done:  # stopped at a stop id, which vLLM may leave out of token_ids
                    ids.append(c.stop_reason if isinstance(c.stop_reason, int) else stops[0])
                out.prompt_index.append(i)
                out.response_ids.append(ids)
                out.finished.append(done)
        out.responses = continuations(self.tok, [prompt_ids[i] for i in out.prompt_index], out.response_ids)
        log.info("generated %d samples with vLLM", len(out.responses))
        return out


def merged_weights(model):
    """(name, tensor) of the model's current weights as its plain form names them: a PeftModel's adapter is
    merged into the base weights for the walk and unmerged after, and its own parameters are left out."""
    peft = hasattr(model, "merge_adapter")
    if peft:
        model.merge_adapter()
    try:
        for name, weight in model.named_parameters():
            if peft:
                if "lora_" in name or "original_module" in name:
                    continue
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                name = name.replace("modules_to_save.default.", "")
            yield name, weight.data
    finally:
        if peft:
            model.unmerge_adapter()


def require_vllm() -> None:
    """`generate.backend: vllm` needs vLLM installed and a GPU; otherwise one line saying which is missing."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "generate.backend: vllm is not installed (pip install vllm, on a machine with a GPU); "
            "or use generate.backend: transformers"
        )
    import torch

    if not torch.cuda.is_available():
        raise UserError("generate.backend: vllm needs a GPU and none is visible; use generate.backend: transformers")
