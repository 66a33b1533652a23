"""DPO: the update_policy step (method dpo) against the same work done with the libraries alone.

The step samples update_policy.k responses per policy prompt, has the round's proxy RM pick the best and
worst of each, and trains the policy on those pairs with TRL's DPOTrainer. The bare side does the same with
nothing of the project's: it loads the models with from_pretrained, samples with `model.generate`, scores with
a batched forward of the RM, calls DPOTrainer directly on the pairs (the same DPOConfig values) and saves the
policy. Both use the step's seed, so they draw the same samples and train on the same pairs (checked: the
training losses must be equal, else the benchmark stops). Target: the step takes at most 1.05x the bare
time. The table splits the bare side into its parts, which shows where a round's update spends its time.
Takes about 6 minutes on 2 CPU cores (the first run also builds round 1's proxy RM, a few minutes more).
"""

from __future__ import annotations

import tempfile
import time

from _common import chdir, config, default_project, interleaved, med, overrides, parser, quiet, report, table, verdict

TARGET = 1.05


def main() -> None:
    args = parser(__doc__).parse_args()
    quiet()
    with chdir(default_project(args.out)):
        import torch

        from rlhf.core.paths import round_paths
        from tasks.update_policy import update_policy

        cfg, rnd = config(overrides(args)), "r01"
        torch.set_num_threads(cfg.runtime.threads)
        _round_until_rm(cfg, rnd)
        parts: dict[str, list[float]] = {}
        loss = {}

        def step() -> None:
            loss["step"] = update_policy(cfg, rnd)["train_loss"]

        def bare() -> None:
            for part, secs in _bare(cfg, rnd, round_paths(rnd).reward_model, loss).items():
                parts.setdefault(part, []).append(secs)

        times = interleaved({"bare transformers + TRL": bare, "update_policy step": step}, args.repeats)
    if abs(loss["step"] - loss["bare"]) > 1e-6 * max(1.0, abs(loss["bare"])):
        raise SystemExit(f"dpo: the two sides trained on different pairs (loss {loss['step']} vs {loss['bare']})")
    ratio = med(times["update_policy step"]) / med(times["bare transformers + TRL"])
    rows = [[k, med(v), min(v)] for k, v in times.items()]
    rows += [[f"  bare: {k}", med(v[1:]), min(v[1:])] for k, v in parts.items()]  # v[0]: the warm-up
    up = cfg.update_policy
    text = (
        f"dpo: {up.k} samples per policy prompt, {up.dpo.epochs:g} epochs, batch {up.batch_size}; training loss "
        f"step {loss['step']:.6f}, bare {loss['bare']:.6f} (equal, checked: the same pairs)\n"
        + table(["side", "median s", "min s"], rows)
        + f"\nstep / bare time: {verdict(ratio, TARGET, higher_is_better=False)}"
    )
    report(
        "dpo",
        args.out,
        text,
        {"times": times, "bare_parts": parts, "train_loss": loss, "ratio": ratio, "target": TARGET},
    )


def _round_until_rm(cfg, rnd: str) -> None:
    """generate, label and train_rm of round 1, once: what the update needs."""
    from rlhf.core.paths import round_paths
    from tasks.generate import generate
    from tasks.label import label
    from tasks.train_rm import train_rm

    paths = round_paths(rnd)
    for step, out in ((generate, paths.samples), (label, paths.labels), (train_rm, paths.reward_model)):
        if not out.exists():
            print(f"building {out}", flush=True)
            step(cfg, rnd)


def _bare(cfg, rnd: str, rm_dir, loss: dict) -> dict[str, float]:
    """The update with transformers and TRL alone; returns the seconds of each part."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from rlhf.core.paths import SFT
    from rlhf.core.prompts import read_prompts
    from rlhf.core.seeds import stage_seed

    up, s, seed = cfg.update_policy, cfg.generate, stage_seed(cfg, "update_policy", rnd)
    clock, t = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        clock[name], t = time.perf_counter() - t, time.perf_counter()

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(SFT.policy)
    policy = AutoModelForCausalLM.from_pretrained(SFT.policy)
    ref = AutoModelForCausalLM.from_pretrained(SFT.policy).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    prompts = [  # rendered as the policy's chat template renders a question
        tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False, add_generation_prompt=True)
        for p in read_prompts(cfg.prompts.policy)
    ]
    lap("load models")
    tok.padding_side = "left"
    texts = [p for p in prompts for _ in range(up.k)]
    responses, finished = [], []
    policy.eval()
    for start in range(0, len(texts), s.batch_size):
        batch = tok(texts[start : start + s.batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            seqs = policy.generate(
                **batch,
                do_sample=True,
                temperature=s.temperature,
                top_k=s.top_k or None,
                top_p=s.top_p,
                max_new_tokens=s.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new = seqs[:, batch["input_ids"].shape[1] :]
        responses += [" " + r if r else r for r in tok.batch_decode(new, skip_special_tokens=True)]
        finished += [tok.eos_token_id in ids for ids in new.tolist()]
    lap("model.generate")
    tok.padding_side = "right"
    scores = []
    # a finished response is scored with its eos; one cut off without, less the penalty (update_policy.unfinished)
    scored = [p + r + (tok.eos_token if done else "") for p, r, done in zip(texts, responses, finished)]
    for start in range(0, len(scored), 64):
        with torch.no_grad():
            scores.append(rm(**tok(scored[start : start + 64], return_tensors="pt", padding=True)).logits[:, 0])
    cut = ~torch.tensor(finished)
    penalty = up.missing_eos_penalty * cut if up.unfinished == "penalty" else torch.zeros(len(cut))
    scores = (torch.cat(scores) - penalty).numpy().reshape(len(prompts), up.k)
    lap("RM forward")
    rows = [
        {"prompt": p, "chosen": responses[i * up.k + b], "rejected": responses[i * up.k + w]}
        for i, (p, b, w) in enumerate(zip(prompts, scores.argmax(1), scores.argmin(1)))
        if scores[i, b] > scores[i, w] and responses[i * up.k + b] != responses[i * up.k + w]
    ]
    with tempfile.TemporaryDirectory() as scratch:
        args = DPOConfig(
            output_dir=scratch,
            seed=seed,
            data_seed=seed,
            bf16=False,
            use_cpu=True,
            activation_checkpointing=False,
            save_strategy="no",
            report_to="none",
            logging_steps=50,
            disable_tqdm=True,
            dataloader_num_workers=0,
            beta=up.dpo.beta,
            num_train_epochs=up.dpo.epochs,
            per_device_train_batch_size=up.batch_size,
            learning_rate=up.dpo.learning_rate,
            max_length=up.max_length,
        )
        policy.train()
        trainer = DPOTrainer(
            model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
        )
        loss["bare"] = trainer.train().training_loss
        lap("DPOTrainer")
        policy.save_pretrained(scratch, safe_serialization=True)
        tok.save_pretrained(scratch)
        lap("save")
    return clock


if __name__ == "__main__":
    main()
