"""Over-optimisation as a curve inside a round (evaluate.checkpoints): each checkpoint the policy update saved
scored on the held-out prompts as the final policy is, then Gao et al.'s forms fitted to the curve and to
best-of-n (rlhf/evaluation/fits.py). tasks/evaluate.py calls it; docs/evaluation.md describes it."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from rlhf.core.config import Config, Sampling
from rlhf.core.io import read_jsonl
from rlhf.core.paths import round_paths
from rlhf.evaluation import metrics as stats
from rlhf.judges import checked


def pure_sampling(e, k: int) -> Sampling:
    """Sampling from the policy itself: temperature 1, no top-k or top-p. Built without Sampling's checks,
    which are generate's (k >= 2 for pairs): evaluate may draw one sample per prompt or per cell."""
    return Sampling.model_construct(
        k=k, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size
    )


POINT = "point.json"  # a checkpoint's scores, kept in its folder once its weights are deleted


@dataclass
class Scoring:
    """What scoring a checkpoint of the round needs: the held-out prompts, the judge, the proxy reward, the
    KL reference, and the round's sampler (its engine reused, the checkpoint's weights swapped in)."""

    cfg: Config
    rnd: str
    tok: object
    prompts: list[str]
    conversations: list
    judge: object
    reward: object
    ref: object
    sample: object


def final_point(e, metrics: dict, gold: np.ndarray, proxy: np.ndarray) -> dict:
    """The curve's last point: the round's own numbers."""
    return {
        "step": e.checkpoints + 1,
        "fraction": 1.0,
        "gold": float(gold.mean()),
        "proxy": float(proxy.mean()),
        "gold_sem": metrics["gold"]["sem"],
        "proxy_sem": metrics["proxy"]["sem"],
        "kl": metrics["kl"]["per_sequence"],
        "kl_sem": metrics["kl"]["per_sequence_sem"],
        "d": metrics["kl"]["d"],
        "d_sem": metrics["kl"]["d_sem"],
        "win_vs_sft": metrics["win_rate"]["vs_sft"]["mean"],
    }


def curve(c: Scoring, final: dict) -> list[dict] | dict:
    """Each checkpoint of the round scored on the held-out prompts as the final policy is (its own samples:
    gold, proxy, the KL estimate to the reference and d with their errors, win rate against SFT), then the
    final point. A checkpoint's weights are deleted as soon as it is scored, its point kept in its folder
    (POINT) until the curve is whole, so that evaluate run again after a crash scores only the rest: each
    checkpoint samples from its own seed, so the curve is the same either way. The folder goes once the curve
    is written."""
    import shutil

    import torch

    from rlhf.core.io import write_json
    from rlhf.ml import checkpoints, models, sampling

    e, folder = c.cfg.evaluate, round_paths(c.rnd).checkpoints
    saved = checkpoints.saved(folder)
    if len(saved) != e.checkpoints:
        return stats.missing(
            f"{len(saved)} of {e.checkpoints} checkpoints under {folder}: evaluate deletes them once scored; "
            f"re-run update_policy (dvc repro -f -s update_policy@{c.rnd}) for the curve"
        )
    sft = gold_of(round_paths("r00").eval_samples, len(c.prompts))
    final_model, points = c.sample.model, []
    try:
        for path, meta in saved:
            if (path / POINT).is_file():  # scored by an earlier attempt, which then stopped
                points.append(json.loads((path / POINT).read_text()))
                continue
            policy = models.load_policy(path, models.device(c.cfg))
            c.sample.model = policy  # the round's sampler on this checkpoint's weights (vLLM: loaded in place)
            torch.manual_seed(c.sample.seed + meta["index"])
            s = c.sample(c.prompts, e.samples_per_prompt, pure_sampling(e, e.samples_per_prompt))
            asked = [c.conversations[i] for i in s.prompt_index]
            gold = checked(c.judge.score(asked, s.responses), f"evaluate@{c.rnd} (checkpoint {meta['index']})")
            proxy = c.reward([c.prompts[i] for i in s.prompt_index], s.responses, s.finished)
            kl, _, n_tokens = (x.double().numpy() for x in sampling.sequence_kl(policy, c.ref, c.tok, c.prompts, s))
            kl = stats.kl_estimate(kl, n_tokens)
            win = stats.win_rate(gold.reshape(len(c.prompts), -1), sft) if sft is not None else {"mean": None}
            point = {"step": meta["index"], "fraction": meta["fraction"], "train_step": meta["step"]}
            point |= {"gold": float(gold.mean()), "proxy": float(np.mean(proxy)), "kl": kl["per_sequence"]}
            point |= {"kl_sem": kl["per_sequence_sem"], "d": kl["d"], "d_sem": kl["d_sem"]}
            point |= {"gold_sem": stats.summary(gold)["sem"], "proxy_sem": stats.summary(proxy)["sem"]}
            points.append(point | {"win_vs_sft": win["mean"]})
            write_json(path / POINT, points[-1])
            for f in path.iterdir():  # the weights: scratch as large as the policy, scored now
                if f.name not in (POINT, checkpoints.META):
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
    finally:
        c.sample.model = final_model
    torch.manual_seed(c.sample.seed)  # what evaluate draws next, whether the points were scored now or before
    shutil.rmtree(folder)
    return [*points, final]


def round_fits(cfg: Config, rnd: str, metrics: dict, reward) -> dict:
    """Gao et al.'s forms fitted to the round's curve and best-of-n (rlhf/evaluation/fits.py), the gains
    measured from the reference's own held-out scores where the reference is one round evaluated before."""
    from rlhf.evaluation import fits
    from rlhf.ml.policy import reference_rounds

    curve = metrics.get("curve") if isinstance(metrics.get("curve"), list) else []
    refs, baseline = reference_rounds(cfg, rnd), {}
    path = round_paths(refs[0]).eval_samples
    if len(refs) == 1 and refs[0] in (cfg.rounds[rnd], "r00") and path.is_file():
        rows = read_jsonl(path, required=("prompt", "response", "gold"))
        responses, finished = [r["response"] for r in rows], [r.get("finished", True) for r in rows]
        baseline = {
            "gold": float(np.mean([r["gold"] for r in rows])),
            "proxy": float(np.mean(reward([r["prompt"] for r in rows], responses, finished))),
        }
    out = fits.round_fits(curve, metrics.get("best_of_n"), baseline)
    out["baseline"] = {"round": refs[0], **baseline} if baseline else stats.missing("no single evaluated reference")
    return out


def gold_of(path, n_prompts: int) -> np.ndarray | None:
    """An earlier round's held-out gold scores as a (prompts, samples) matrix, or None without them."""
    if not path.is_file():
        return None
    gold = np.array([r["gold"] for r in read_jsonl(path, required=("gold",))])
    return gold.reshape(n_prompts, -1) if gold.size % n_prompts == 0 else np.empty((0, 0))
