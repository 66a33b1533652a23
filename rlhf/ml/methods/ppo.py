"""PPO for causal LMs, the InstructGPT recipe in one readable file (TRL removed its PPOTrainer in 1.13).

Each iteration samples a rollout batch, then takes `ppo_epochs` passes of minibatch steps over it:
- score: the proxy RM at the end of each response (with its EOS; one cut at max_new_tokens without, and
  with `update_policy.unfinished`: penalty, less `missing_eos_penalty`, or drop, left out of the loss);
  per-token reward r_t = -beta (log pi(y_t) - log pi_ref(y_t)), the score added at the
  last token; beta is fixed, or adapted toward `target_kl` (Ziegler et al. 2019's controller);
- advantages by GAE(gamma, lambda) on a value model separate from the policy (initialised from the proxy
  RM; the value of each prefix is the RM head applied to that position's hidden state), whitened;
- losses: the clipped policy ratio (dual-clipped for negative advantages), the clipped value error, plus the
  co-training NLL when configured;
- the step size bounded: an iteration's passes end at the first minibatch whose approximate KL to the rollout
  policy exceeds `stop_kl` (docs/policy-updates.md says why: without it one iteration could move the policy
  35x further from its reference than the one before).
Dropout stays off (eval mode), so at the first minibatch the new and old log-probs agree: ratio 1.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from rlhf.core.config import PPO, Sampling
from rlhf.ml import sampling

log = logging.getLogger("rlhf")
MAX_GRAD_NORM = 1.0
# an iteration's stats averaged over its minibatch steps (approx_kl and grad_norm_max: the largest)
MEANS = ("policy_loss", "value_loss", "clipfrac", "dual_clipped", "grad_norm", "advantage_std", "value_error")


@dataclass
class Rollout:
    """One rollout batch: packed sequences and response-aligned [rows, longest response] tensors."""

    ids: object
    attn: object
    start: object
    length: object
    mask: object
    logp: object
    values: object
    advantages: object
    returns: object
    temperature: float  # the rollouts': every log-prob is of the distribution they were sampled from
    stats: dict


def values_of(value_model, ids, attn, start, length, grad: bool = True):
    """The value model's estimate at each prefix before a response token: the RM head on hidden states."""
    import torch

    backbone, head = getattr(value_model, value_model.base_model_prefix), value_model.score
    pos, mask = sampling.response_positions(start, length)
    pos = pos.clamp(max=ids.shape[1] - 1).to(value_model.device)
    with torch.set_grad_enabled(grad):
        hidden = backbone(
            input_ids=ids.to(pos.device), attention_mask=attn.to(pos.device), use_cache=False
        ).last_hidden_state
        v = head(hidden)[..., 0].float().gather(1, pos - 1)  # a combined RM's first (preference) head
    return v * mask.to(v.device)


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimates and returns, vectorised over rows, one step per token position."""
    import torch

    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        nxt = mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        next_value = values[:, t + 1] * nxt if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * nxt * running
        adv[:, t] = running
    adv = adv * mask
    return adv, (adv + values) * mask


def whiten(x, mask):
    mean = (x * mask).sum() / mask.sum()
    var = (((x - mean) * mask) ** 2).sum() / mask.sum()
    return (x - mean) * (var + 1e-8).rsqrt() * mask


def rollout(
    policy,
    ref,
    value_model,
    tok,
    prompts,
    reward_fn,
    p: PPO,
    k: int,
    s: Sampling,
    beta: float,
    batch_size: int,
    sample,
    unfinished_as: tuple[str, float] = ("penalty", 1.0),
) -> Rollout:
    """One rollout batch. `unfinished_as`: update_policy.unfinished and missing_eos_penalty."""
    import torch

    samples = sample(prompts, k, s) if sample else sampling.generate(policy, tok, prompts, k, s)
    asked = [prompts[i] for i in samples.prompt_index]
    score = torch.as_tensor(reward_fn(asked, samples.responses, samples.finished), dtype=torch.float32)
    unfinished = ~torch.tensor(samples.finished)
    if unfinished_as[0] == "penalty":
        score = score - unfinished_as[1] * unfinished
    ids, attn, start, length = sampling.pack(tok, asked, samples.response_ids)
    chunks = {"logp": [], "ref": [], "values": []}
    for sl in _chunks(len(asked), batch_size):
        part = (ids[sl], attn[sl], start[sl], length[sl])
        chunks["logp"].append(sampling.response_logprobs(policy, *part, False, s.temperature)[0].cpu())
        chunks["ref"].append(sampling.response_logprobs(ref, *part, False, s.temperature)[0].cpu())
        chunks["values"].append(values_of(value_model, *part, grad=False).cpu())
    width = int(length.max())
    logp, ref_logp, values = (torch.cat([_pad(c, width) for c in chunks[key]]) for key in ("logp", "ref", "values"))
    _, mask = sampling.response_positions(start, length)
    mask = mask.float()
    if unfinished_as[0] == "drop":  # no loss on a response that was cut off
        mask = mask * ~unfinished[:, None]
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    rewards[torch.arange(len(asked)), length - 1] += score
    adv, returns = gae(rewards, values, mask, p.gamma, p.lam)
    if p.whiten:
        adv = whiten(adv, mask)
    stats = {
        "score": float(score.mean()),
        "kl": float(kl.sum(1).mean()),
        "beta": beta,
        "finished": float(1 - unfinished.float().mean()),
        "length": float(length.float().mean()),
    }
    return Rollout(ids, attn, start, length, mask, logp, values, adv, returns, s.temperature, stats)


def _chunks(n: int, size: int):
    return [slice(i, i + size) for i in range(0, n, size)]


def _pad(x, width: int):
    import torch.nn.functional as F

    return F.pad(x, (0, width - x.shape[1]))


def policy_loss(adv, ratio, p: PPO):
    """Per token, PPO's clipped surrogate loss, max(-A r, -A clip(r, 1 - clip, 1 + clip)), and where dual_clip
    bounded it: with A < 0 the clipped loss still grows with r without end, so a token the policy now finds far
    likelier than when it was sampled (r in the hundreds after a large step) would dominate the batch; dual clip
    caps that loss at dual_clip |A| (Ye et al. 2020), where its gradient is zero. Returns (loss, capped)."""
    import torch

    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - p.clip, 1 + p.clip))
    if p.dual_clip is None:
        return pg, torch.zeros_like(pg, dtype=torch.bool)
    capped = (adv < 0) & (pg > -p.dual_clip * adv)
    return torch.where(capped, -p.dual_clip * adv, pg), capped


def ppo_step(policy, value_model, r: Rollout, rows, p: PPO):
    """The loss of one minibatch (rows of the rollout) and its statistics, among them `approx_kl`: the mean
    per-token KL of the rollout policy to the current one, E[(ratio - 1) - log ratio] (Schulman's k3, never
    negative), how far this iteration's steps so far have moved the policy on these rows."""
    import torch

    part = (r.ids[rows], r.attn[rows], r.start[rows], r.length[rows])
    width = int(r.length[rows].max())
    mask, old_logp, adv, ret, old_v = (
        x[rows, :width].to(policy.device) for x in (r.mask, r.logp, r.advantages, r.returns, r.values)
    )
    logp = sampling.response_logprobs(policy, *part, temperature=r.temperature)[0]
    ratio = torch.exp(logp - old_logp)
    pg, capped = policy_loss(adv, ratio, p)
    v = values_of(value_model, *part).to(policy.device)
    v_clipped = old_v + (v - old_v).clamp(-p.value_clip, p.value_clip)
    vf = 0.5 * torch.max((v - ret) ** 2, (v_clipped - ret) ** 2)
    n = mask.sum().clamp(min=1)  # every row dropped (unfinished: drop): no loss
    pg_loss, vf_loss = (pg * mask).sum() / n, (vf * mask).sum() / n
    ratio, log_ratio = ratio.detach(), (logp - old_logp).detach()

    def mean(x) -> float:
        return float((x * mask).sum() / n)

    stats = {
        "ratio": mean(ratio),
        "ratio_max_dev": float(((ratio - 1).abs() * mask).max()),
        "clipfrac": mean(((ratio - 1).abs() > p.clip).float()),
        "dual_clipped": mean(capped.float()),
        "approx_kl": mean((ratio - 1) - log_ratio),
        "advantage_mean": mean(adv),
        "advantage_std": mean((adv - mean(adv)) ** 2) ** 0.5,
        "value_error": mean((v.detach() - ret).abs()),
        "policy_loss": float(pg_loss.detach()),
        "value_loss": float(vf_loss.detach()),
    }
    return pg_loss + p.value_coef * vf_loss, stats


def optimise(policy, value_model, r: Rollout, p: PPO, opt, batch_size: int, aux=None) -> tuple[list[dict], str | None]:
    """`ppo_epochs` passes of minibatch steps over one rollout batch. Each minibatch's stats get `grad_norm`
    (before clipping). With `stop_kl`, the first minibatch whose approx_kl exceeds it ends the iteration before
    stepping on it (Stable-Baselines3's and CleanRL's target_kl): the policy has moved far enough from the one
    that sampled the batch that its advantages no longer describe it. Returns the stats of the minibatches
    stepped on (the first always is: its ratio is 1) and why the iteration stopped early (None: it did not)."""
    import torch

    params = [q for group in opt.param_groups for q in group["params"]]
    planned = p.ppo_epochs * math.ceil(len(r.ids) / batch_size)
    steps = []
    for _ in range(p.ppo_epochs):
        for rows in torch.randperm(len(r.ids)).split(batch_size):
            loss, st = ppo_step(policy, value_model, r, rows, p)
            if steps and p.stop_kl is not None and st["approx_kl"] > p.stop_kl:
                return steps, (
                    f"stopped after {len(steps)}/{planned} minibatch steps: approx KL to the rollout policy "
                    f"{st['approx_kl']:.4f} > stop_kl {p.stop_kl:g}"
                )
            opt.zero_grad()
            loss.backward()
            if aux is not None and (extra := aux.after_update_batch(len(rows))) is not None:
                aux.loss(policy, extra).backward()
            st["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
            opt.step()
            steps.append(st)
    return steps, None


def adapt_beta(beta: float, kl: float, p: PPO, n: int) -> float:
    """Ziegler et al.'s proportional controller: move beta so the per-sequence KL approaches target_kl."""
    if p.target_kl is None:
        return beta
    error = min(max(kl / p.target_kl - 1, -0.2), 0.2)
    return beta * (1 + error * n / p.horizon)


def train(
    policy,
    ref,
    value_model,
    tok,
    prompts: list[str],
    reward_fn,
    p: PPO,
    k: int,
    s: Sampling,
    batch_size: int,
    seed: int,
    aux=None,
    sample=None,
    log_stats=None,
    unfinished_as: tuple[str, float] = ("penalty", 1.0),
    checkpoints=None,
) -> list[dict]:
    """PPO over `prompts` (p.epochs passes); returns one stats dict per iteration (rollout batch). `sample`:
    the round's Sampler of `policy` (None: transformers); `log_stats(stats, iteration)`: the training curves;
    `checkpoints`: rlhf.ml.checkpoints.Checkpoints, saving intermediate policies by iteration."""
    import random

    import torch

    params = [q for q in policy.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": params, "lr": p.learning_rate},
            {"params": list(value_model.parameters()), "lr": p.value_learning_rate},
        ]
    )
    rng = random.Random(seed)
    order = [i for _ in range(math.ceil(p.epochs) + 1) for i in rng.sample(range(len(prompts)), len(prompts))]
    iterations = max(1, math.ceil(p.epochs * len(prompts) / p.rollout_prompts))
    beta, history = p.kl_coef, []
    after_iteration = checkpoints.loop(iterations) if checkpoints is not None else lambda it: None
    for it in range(iterations):
        batch = [prompts[i] for i in order[it * p.rollout_prompts : (it + 1) * p.rollout_prompts]]
        policy.eval(), value_model.eval()  # dropout off: ratio 1 at the first minibatch
        r = rollout(policy, ref, value_model, tok, batch, reward_fn, p, k, s, beta, batch_size, sample, unfinished_as)
        steps, stopped = optimise(policy, value_model, r, p, opt, batch_size, aux)
        stats = {
            **r.stats,
            "first_minibatch": steps[0],
            "minibatches": steps,
            "steps": len(steps),
            "stopped": stopped is not None,
            **{key: sum(st[key] for st in steps) / len(steps) for key in MEANS},
            "approx_kl": max(st["approx_kl"] for st in steps),
            "grad_norm_max": max(st["grad_norm"] for st in steps),
        }
        history.append(stats)
        if log_stats:
            log_stats({key: v for key, v in stats.items() if key not in ("first_minibatch", "minibatches")}, it + 1)
        log.info(
            "ppo %d/%d: score %.3f  kl %.3f  beta %.4f  clipfrac %.3f  approx_kl %.4f  grad_norm %.2f%s",
            it + 1,
            iterations,
            stats["score"],
            stats["kl"],
            beta,
            stats["clipfrac"],
            stats["approx_kl"],
            stats["grad_norm"],
            f"  ({stopped})" if stopped else "",
        )
        beta = adapt_beta(beta, r.stats["kl"], p, len(r.ids))
        after_iteration(it + 1)
    return history


def update(u) -> dict:
    """The update_policy method `ppo` (u: tasks.update_policy.Update)."""
    from rlhf.ml import models, tracking

    cfg = u.cfg
    value_model = models.load_reward_model(u.paths.reward_model, u.dev)  # the value model starts as the proxy RM
    value_model.config.pad_token_id = u.tok.pad_token_id
    up = cfg.update_policy
    with tracking.curves(cfg, f"{u.rnd}-update_policy") as log_stats:
        history = train(
            u.policy,
            u.ref,
            value_model,
            u.tok,
            u.prompts,
            u.proxy,
            up.ppo,
            up.k,
            cfg.rollouts(),
            up.batch_size,
            u.seed,
            u.aux,
            u.sample,
            log_stats,
            (up.unfinished, up.missing_eos_penalty),
            u.checkpoints,
        )
    return {
        "iterations": len(history),
        "score_first": history[0]["score"],
        "score_last": history[-1]["score"],
        "kl_last": history[-1]["kl"],
        "beta_last": history[-1]["beta"],
        "stopped_early": sum(h["stopped"] for h in history),
        "rollout_kl": [h["kl"] for h in history],  # per iteration: tasks/update_policy.py's KL-spike alarm
    }
