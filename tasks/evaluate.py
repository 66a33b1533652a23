"""evaluate: the round's policy on held-out prompts: gold and proxy scores, the proxy's pairwise accuracy,
win rates, KL to the reference, best-of-n and alarms; the samples themselves go to eval_samples.jsonl,
and gold and proxy over the reward landscape grid (rlhf/evaluation/landscape.py) to landscape.json.

Samples are drawn at temperature 1 with no top-k/top-p, so they come from the policy itself. KL(policy ||
ref) sums, over each sampled response, the exact KL of the two next-token distributions at every
position; their mean over the responses is an unbiased estimate of the sequence KL that is never negative,
reported with its standard error (rlhf/evaluation/metrics.py: kl_estimate); d = sqrt(KL) is the distance Gao
et al. plot gold against. The reference is the one the update regularised toward
(`update_policy.ref`); with `ref: init` the KL to the SFT policy is added. Win rates compare gold scores
with the previous round's and the SFT policy's samples of the same prompts (ties count half). The curve
inside the round and its fits (evaluate.checkpoints) are rlhf/evaluation/curves.py's; what the policy forgets
(held-out text NLL, conversation checks, lm_eval) is rlhf/evaluation/forgetting.py's.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from rlhf.core.config import Config
from rlhf.core.io import read_jsonl, write_json, write_jsonl
from rlhf.core.paths import SFT, round_paths
from rlhf.core.prompts import describe, last_user_turn, messages_of, read_prompts
from rlhf.evaluation import curves, forgetting
from rlhf.evaluation import metrics as stats
from rlhf.judges import checked, judge_files, make_judge

log = logging.getLogger("rlhf")


PARAMS = (
    "runtime.seed",
    "runtime.threads",
    "runtime.device",
    "runtime.logits_mb",
    "generate.backend",  # the engine of its samplings; their params are evaluate's own
    "evaluate",
    "label.judge",
    "update_policy.reward",
    "update_policy.uwo_lambda",
    "update_policy.init",
    "update_policy.eta",
    "update_policy.ref",
    "prompts.eval",
    "prompts.label",  # the landscape marks its cells that are training prompts
    "prompts.policy",
    "prompts.max_prompt_length",
    "prompts.too_long",
)


def reads(cfg: Config, rnd: str) -> list[str]:
    """The round's policy, its reward and reference, the held-out prompts, the training prompts (the
    landscape's `seen`), the judge's files, the round's samples (for the alarm on unfinished ones), and the
    earlier held-out samples the win rates compare with (round 0: the SFT policy alone).

    Not the round's checkpoints (evaluate.checkpoints): scratch that update_policy writes beside its policy
    and evaluate deletes once scored. They change only when the policy does (the same run writes both, and
    evaluate.checkpoints is one of update_policy's params), so the policy stands for them as a dep."""
    from rlhf.ml.policy import reference_rounds
    from rlhf.ml.reward import reward_rounds

    policy = str(round_paths(rnd).policy)
    inputs = [
        *cfg.prompts.eval.files(),
        *cfg.prompts.label.files(),
        *cfg.prompts.policy.files(),
        *judge_files(cfg),
        *forgetting.reads(cfg),
    ]
    if rnd == "r00":
        return [policy, *inputs]
    refs = dict.fromkeys([*reference_rounds(cfg, rnd), "r00"])  # with ref: init, the KL to the SFT policy too
    earlier = [
        *(str(round_paths(r).policy) for r in refs if r != rnd),
        *(str(round_paths(r).reward_model) for r in reward_rounds(cfg, rnd)),
        *(str(round_paths(r).eval_samples) for r in dict.fromkeys([cfg.rounds[rnd], "r00"])),
        str(round_paths(rnd).samples),
    ]
    return [policy, *earlier, *inputs]


def evaluate(cfg: Config, rnd: str) -> dict:
    from rlhf.ml import chat, models, sampling, tracking
    from rlhf.ml.policy import reference
    from rlhf.ml.reward import ProxyReward
    from rlhf.ml.sampler import Sampler

    seed = models.setup(cfg, "evaluate", rnd)
    paths, dev, e = round_paths(rnd), models.device(cfg), cfg.evaluate
    tok = models.load_tokenizer(paths.policy)
    rows, prompts, too_long = chat.policy_prompts(
        tok, read_prompts(cfg.prompts.eval, "prompts.eval"), cfg.prompts, "prompts.eval"
    )
    policy = models.load_policy(paths.policy, dev)
    sample = Sampler(cfg, tok, paths.policy, seed, policy)
    pure = curves.pure_sampling(e, k=max([e.samples_per_prompt, *e.best_of_n]))
    s = sample(prompts, pure.k, pure)
    judge = make_judge(cfg)
    conversations = [messages_of(r["prompt"]) for r in rows]  # what the judge reads
    gold_all = checked(judge.score([conversations[i] for i in s.prompt_index], s.responses), f"evaluate@{rnd}")
    gold_all = gold_all.reshape(len(prompts), pure.k)
    reward = None if rnd == "r00" else ProxyReward(cfg, rnd, tok, dev)
    proxy_all = (
        None
        if reward is None
        else reward([prompts[i] for i in s.prompt_index], s.responses, s.finished).reshape(len(prompts), pure.k)
    )
    if e.best_of_n and proxy_all is not None:
        best_of_n = stats.best_of_n(proxy_all, gold_all, e.best_of_n)
    # The statistics below use the first samples_per_prompt samples of each prompt.
    keep = [i * pure.k + j for i in range(len(prompts)) for j in range(e.samples_per_prompt)]
    s = sampling.Samples(
        *([getattr(s, f)[i] for i in keep] for f in ("prompt_index", "responses", "response_ids", "finished"))
    )
    gold = gold_all[:, : e.samples_per_prompt]
    metrics = {
        "round": rnd,
        "gold": {**stats.summary(gold.ravel()), "best": judge.best},
        "finished": sum(s.finished) / len(s.finished),
        "length": sum(map(len, s.response_ids)) / len(s.response_ids),
    }
    if too_long:  # held-out prompts over prompts.max_prompt_length, dropped or cut before sampling
        metrics["too_long"] = {"prompts": too_long, "action": cfg.prompts.too_long}
    metrics["prompt_set"] = describe(cfg.prompts.eval)
    metrics["alarms"] = stats.unfinished("evaluate", metrics["finished"], e.max_new_tokens)
    samples = [
        {
            "prompt_id": rows[i]["id"],
            "prompt": prompts[i],
            "messages": conversations[i],
            "response": r,
            "finished": done,
            "gold": float(g),
        }
        for i, r, done, g in zip(s.prompt_index, s.responses, s.finished, gold.ravel())
    ]
    if rnd == "r00":  # the SFT policy is its own reference and has no proxy RM yet
        metrics["kl"] = {"per_sequence": 0.0, "per_sequence_sem": 0.0, "per_token": 0.0, "d": 0.0}
    else:
        proxy = proxy_all[:, : e.samples_per_prompt]
        for row, p in zip(samples, proxy.ravel()):
            row["proxy"] = float(p)
        metrics["proxy"] = stats.summary(proxy.ravel())
        metrics["proxy_accuracy"] = stats.pairwise_accuracy(proxy, gold)
        metrics["mmd"] = stats.standardised_mmd(proxy.ravel(), gold.ravel())
        if e.best_of_n:
            metrics["best_of_n"] = best_of_n
        refs = {"kl": reference(cfg, rnd, dev)}
        if cfg.update_policy.ref != "sft":
            refs["kl_sft"] = models.load_policy(SFT.policy, dev)
        for key, ref in refs.items():
            kl, log_ratio, n_tokens = (x.double().numpy() for x in sampling.sequence_kl(policy, ref, tok, prompts, s))
            metrics[key] = stats.kl_estimate(kl, n_tokens) | {"sampled_log_ratio": stats.summary(log_ratio)}
        metrics["kl"]["reference"] = cfg.update_policy.ref
        metrics["win_rate"], before, earlier = _against_earlier(cfg, rnd, gold, reward)
        now = {"gold": float(gold.mean()), "proxy": float(proxy.mean())}
        generated = [r["finished"] for r in read_jsonl(paths.samples, required=("finished",))]
        metrics["alarms"] += stats.unfinished("generate", sum(generated) / len(generated), cfg.generate.max_new_tokens)
        metrics["alarms"] += stats.alarms(metrics["kl"]["sampled_log_ratio"], now, before)
        metrics["alarms"] += stats.regressions(metrics["gold"], earlier)
        if paths.training.is_file() and (kls := json.loads(paths.training.read_text()).get("rollout_kl")):
            metrics["alarms"] += stats.kl_spikes(f"update_policy@{rnd}", kls)  # PPO's iterations, as it sampled
    landscape = _landscape(cfg, sample, tok, judge, reward, rnd)
    if e.checkpoints and rnd != "r00":
        ctx = curves.Scoring(cfg, rnd, tok, prompts, conversations, judge, reward, refs["kl"], sample)
        metrics["curve"] = curves.curve(ctx, curves.final_point(e, metrics, gold, proxy))
        metrics["alarms"] += stats.curve_alarms(metrics["curve"]) if isinstance(metrics["curve"], list) else []
    if (e.checkpoints or e.best_of_n) and rnd != "r00":
        metrics["fits"] = curves.round_fits(cfg, rnd, metrics, reward)
    sft = policy if rnd == "r00" else refs.get("kl_sft", refs["kl"])  # the KL's references hold the SFT policy
    pure = curves.pure_sampling(e, e.samples_per_prompt)
    metrics |= forgetting.measure(cfg, rnd, tok, policy, sft, sample, judge, pure, seed)
    sample.close()  # the last sampling: a vLLM engine stops (on an error, it stops as this process ends)
    for alarm in metrics["alarms"]:
        log.warning("evaluate %s: %s", rnd, alarm)
    write_jsonl(paths.eval_samples, samples)
    write_json(paths.landscape, landscape)
    write_json(paths.metrics, metrics)
    with tracking.curves(cfg, "rounds") as log_metrics:  # one run: each round a step of its curves
        log_metrics({f"eval_{k}": v for k, v in tracking.scalars(metrics).items()}, int(rnd.removeprefix("r")))
    return metrics


def _landscape(cfg: Config, sample, tok, judge, reward, rnd: str) -> dict:
    """Gold and proxy over the evaluate.landscape grid ({"axes": {}} when it is off), each cell marked
    `seen` when its prompt is a label or policy prompt (the last user turn of a conversational one)."""
    from rlhf.evaluation import landscape
    from rlhf.ml import chat

    e, spec = cfg.evaluate, cfg.evaluate.landscape
    if not spec.axes:
        return {"axes": {}}
    cells = landscape.prompts(spec)
    texts = chat.render(tok, cells, "evaluate.landscape")
    s = sample(texts, spec.samples, curves.pure_sampling(e, spec.samples))
    gold = checked(judge.score([cells[i] for i in s.prompt_index], s.responses), f"evaluate@{rnd} (landscape)")
    proxy = None if reward is None else reward([texts[i] for i in s.prompt_index], s.responses, s.finished)
    training = {
        last_user_turn(r["prompt"]).strip()
        for key in ("label", "policy")
        for r in read_prompts(getattr(cfg.prompts, key), f"prompts.{key}")
    }
    return landscape.grid(spec, gold, proxy, s.responses, landscape.seen(cells, training))


def _against_earlier(cfg: Config, rnd: str, gold: np.ndarray, reward) -> tuple[dict, dict | None, dict]:
    """Win rates against the previous round and the SFT policy; the previous round's gold and proxy means (its
    samples re-scored by this round's reward) for the over-optimisation alarm; and both rounds' gold summaries
    (by round) for the regression alarm."""
    win, earlier = {}, {}
    for name, other in (("vs_previous", cfg.rounds[rnd]), ("vs_sft", "r00")):
        path = round_paths(other).eval_samples
        if not path.is_file():
            win[name] = stats.missing(f"{path} not found")
            continue
        rows = read_jsonl(path, required=("prompt_id", "prompt", "response", "gold"))
        theirs = np.array([r["gold"] for r in rows])
        theirs = theirs.reshape(gold.shape[0], -1) if theirs.size % gold.shape[0] == 0 else np.empty((0, 0))
        win[name] = stats.win_rate(gold, theirs)
        earlier[name] = rows
    before = None
    if "vs_previous" in earlier:
        rows = earlier["vs_previous"]
        before = {
            "gold": float(np.mean([r["gold"] for r in rows])),
            "proxy": float(
                reward(
                    [r["prompt"] for r in rows], [r["response"] for r in rows], [r.get("finished", True) for r in rows]
                ).mean()
            ),
        }
    golds = {
        other: stats.summary([r["gold"] for r in earlier[name]])
        for name, other in (("vs_previous", cfg.rounds[rnd]), ("vs_sft", "r00"))
        if name in earlier
    }
    return win, before, golds
