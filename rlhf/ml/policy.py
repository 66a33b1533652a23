"""Where a round's policy starts (`update_policy.init`), what it is regularised toward (`ref`), and LoRA.

init: `sft` starts every round from the SFT policy, `last` from the previous round's policy, and `liti`
from init_k = (1 - eta) init_(k-1) + eta policy_(k-1) with init_1 = SFT: a weight interpolation that is
recomputed from the stored round policies, so no round keeps an extra copy of its starting weights.
"""

from __future__ import annotations

from rlhf.core.config import Config, Lora, round_index, round_name
from rlhf.core.paths import SFT, round_paths
from rlhf.ml import models


def initial_policy(cfg: Config, rnd: str, dev: str = "cpu"):
    """The full weights round `rnd` starts from (adapters merged)."""
    import torch

    u = cfg.update_policy
    if u.init == "sft":
        return models.load_policy(SFT.policy, dev)
    if u.init == "last":
        return models.load_policy(round_paths(cfg.rounds[rnd]).policy, dev)
    model = models.load_policy(SFT.policy, dev)
    weights = dict(model.named_parameters())  # named_parameters lists tied weights once
    for j in range(1, round_index(rnd)):
        theta = dict(models.load_policy(round_paths(round_name(j)).policy, dev).named_parameters())
        with torch.no_grad():
            for name, w in weights.items():
                w.mul_(1 - u.eta).add_(theta[name], alpha=u.eta)  # eta = 1 gives exactly theta
    return model


def initial_rounds(cfg: Config, rnd: str) -> list[str]:
    """The rounds whose policies initial_policy reads for round `rnd`."""
    u = cfg.update_policy
    if u.init == "sft":
        return ["r00"]
    if u.init == "last":
        return [cfg.rounds[rnd]]
    return ["r00", *(round_name(j) for j in range(1, round_index(rnd)))]


def reference_rounds(cfg: Config, rnd: str) -> list[str]:
    """The rounds whose policies reference reads for round `rnd`."""
    return initial_rounds(cfg, rnd) if cfg.update_policy.ref == "init" else ["r00"]


def reference(cfg: Config, rnd: str, dev: str = "cpu"):
    """The frozen KL reference of round `rnd`: the SFT policy, or the round's initial policy."""
    ref = initial_policy(cfg, rnd, dev) if cfg.update_policy.ref == "init" else models.load_policy(SFT.policy, dev)
    ref.eval().requires_grad_(False)
    return ref


def trainable_policy(cfg: Config, rnd: str, dev: str = "cpu"):
    """The model the update trains: the initial policy, or with LoRA a PeftModel over the SFT policy whose
    adapter is new (init sft) or continues the previous round's adapter (init last)."""
    u = cfg.update_policy
    prev = round_paths(cfg.rounds[rnd]).policy
    if u.lora.rank and u.init == "last" and models.is_adapter(prev):
        return models.load_policy(prev, dev, trainable=True)
    model = initial_policy(cfg, rnd, dev)
    if not u.lora.rank:
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(u.lora))


def lora_config(lora: Lora):
    from peft import LoraConfig

    targets = lora.target_modules if isinstance(lora.target_modules, str) else sorted(lora.target_modules)
    return LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
