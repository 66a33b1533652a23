"""update_policy: the policy learns from the proxy reward by the method in `update_policy.method`:
ppo, rest, dpo or rloo. Each round starts from `init` (sft, last or liti), is regularised toward `ref`,
trains every weight or a LoRA adapter, and can mix in an auxiliary co-training set."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass

from rlhf.core.config import SAMPLING_PARAMS, TRAINING_RUNTIME, Config
from rlhf.core.paths import RoundPaths, round_paths
from rlhf.core.prompts import read_prompts

log = logging.getLogger("rlhf")


PARAMS = (
    *TRAINING_RUNTIME,
    "runtime.logits_mb",
    *SAMPLING_PARAMS,
    "update_policy",
    "prompts.policy",
    "prompts.max_prompt_length",
    "prompts.too_long",
    "evaluate.checkpoints",  # how many intermediate policies the update saves (scratch, for evaluate's curve)
)


def reads(cfg: Config, rnd: str) -> list[str]:
    """The policies it starts from and is regularised toward, the reward models of its reward, its prompts,
    and the co-training and SFT sets where it mixes them in."""
    from rlhf.ml.policy import initial_rounds, reference_rounds
    from rlhf.ml.reward import reward_rounds

    up = cfg.update_policy
    policies = dict.fromkeys([cfg.rounds[rnd], "r00", *initial_rounds(cfg, rnd), *reference_rounds(cfg, rnd)])
    out = [
        *(str(round_paths(r).policy) for r in policies),
        *(str(round_paths(r).reward_model) for r in reward_rounds(cfg, rnd)),
        *cfg.prompts.policy.files(),
    ]
    if up.cotrain.ratio:
        out.append(up.cotrain.data)
    if up.method == "rest" and up.rest.keep_sft:
        out.append(cfg.prepare.sft)
    return out


@dataclass
class Update:
    """What every method works with: the trainable policy, its frozen reference, the proxy reward and data."""

    cfg: Config
    rnd: str
    paths: RoundPaths
    seed: int
    dev: str
    tok: object
    policy: object  # trained in place; a PeftModel with LoRA
    ref: object
    proxy: object  # rlhf.ml.reward.ProxyReward: (prompts, responses) -> scores, the reward the update optimises
    prompts: list[str]  # rendered by the policy's chat template (rlhf/ml/chat.py)
    sample: object  # rlhf.ml.sampler.Sampler of `policy`: (prompts, k, sampling) -> Samples, on generate.backend
    aux: object  # rlhf.ml.cotrain.Aux, or None without co-training
    scratch: str  # a temporary folder for trainer output
    checkpoints: object = None  # rlhf.ml.checkpoints.Checkpoints: intermediate policies (evaluate.checkpoints)
    trainer: object = None  # the TRL trainer that trained `policy` last (rlhf.ml.models.trainer); None for ppo


def update_policy(cfg: Config, rnd: str) -> dict:
    from rlhf.ml import chat, models, policy
    from rlhf.ml.checkpoints import Checkpoints
    from rlhf.ml.cotrain import Aux
    from rlhf.ml.methods import METHODS
    from rlhf.ml.reward import ProxyReward
    from rlhf.ml.sampler import Sampler

    seed = models.setup(cfg, "update_policy", rnd)
    paths, dev, up = round_paths(rnd), models.device(cfg), cfg.update_policy
    start = round_paths(cfg.rounds[rnd]).policy
    tok = models.load_tokenizer(start)
    _, prompts, too_long = chat.policy_prompts(
        tok, read_prompts(cfg.prompts.policy, "prompts.policy"), cfg.prompts, "prompts.policy"
    )
    model = policy.trainable_policy(cfg, rnd, dev)
    ref = policy.reference(cfg, rnd, dev)
    proxy = ProxyReward(cfg, rnd, tok, dev)
    aux = Aux.from_params(up.cotrain, tok, up.batch_size, up.max_length, seed) if up.cotrain.ratio else None
    log.info(
        "update_policy %s: %s from %s, reference %s%s",
        rnd,
        up.method,
        up.init,
        up.ref,
        f", LoRA rank {up.lora.rank}" if up.lora.rank else "",
    )
    trainable = _trainable(model)  # before training: a sharded model's parameters hold only this rank's share
    with tempfile.TemporaryDirectory() as scratch, Sampler(cfg, tok, start, seed, model) as sample:
        ckpts = Checkpoints(cfg.evaluate.checkpoints, paths.checkpoints, model, tok)
        u = Update(cfg, rnd, paths, seed, dev, tok, model, ref, proxy, prompts, sample, aux, scratch, ckpts)
        summary = METHODS[up.method](u)
    # beside the weights, for evaluate's KL-spike alarm: the rollout KL of each iteration of the methods that
    # sample per iteration (ppo); deterministic (no timings), so the policy's hash reproduces
    training = {"method": up.method, "rollout_kl": summary.get("rollout_kl")}
    models.save(model, tok, paths.policy, {paths.training.name: training}, trainer=u.trainer)
    summary = {"method": up.method, "trainable_parameters": trainable, **summary}
    if cfg.generate.backend == "vllm":  # samplings, and how often (and how long) the engine took new weights
        summary |= {
            "vllm_samplings": sample.calls,
            "vllm_weight_loads": sample.weight_loads,
            "vllm_load_seconds": round(sample.load_seconds, 2),
        }
    if too_long:
        summary[f"prompts_{cfg.prompts.too_long}"] = too_long
    return {**summary, "cotrain": aux.counts()} if aux else summary


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
