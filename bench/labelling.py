"""Labelling: the label step's throughput with a reward-model judge against a bare batched forward of that model.

The judge is a sequence-classification RM built locally (the embedded default's SFT policy with a new,
seeded head, saved with save_pretrained and named as `label.judge: {type: hf}`); the samples are the
policy's own (the generate step's, so their lengths vary as in a run). Like against like:
- `bare forward` runs the judge's model over the texts batch by batch, sorted by length as the judge sorts
  them (`bare forward, unsorted`, in the samples' order, shows what sorting alone gains);
- `judge.score` against `bare forward`: both with their model loaded before the timer;
- the label step loads the judge, scores, forms the pairs and writes labels.jsonl: against `bare forward +
  load`, which loads the model and tokenizer inside the timer too.
Target: the step keeps at least 0.9x the throughput of the bare forward with its load.
Takes about 3 minutes on 2 CPU cores (the first run also builds the project's SFT policy, a few minutes more).
"""

from __future__ import annotations

from _common import chdir, config, default_project, interleaved, med, overrides, parser, quiet, report, table, verdict

TARGET = 0.9


def main() -> None:
    args = parser(__doc__).parse_args()
    quiet()
    with chdir(default_project(args.out)):
        import numpy as np
        import torch

        from rlhf.core.io import read_jsonl
        from rlhf.core.paths import SFT, round_paths
        from rlhf.judges import make_judge
        from rlhf.ml import models
        from tasks.generate import generate
        from tasks.label import label

        rnd = "r01"
        if not round_paths(rnd).samples.is_file():
            generate(config(), rnd)
        torch.manual_seed(0)
        judge_dir = "bench-judge"
        models.save(models.load_reward_model(SFT.policy, num_labels=1), models.load_tokenizer(SFT.policy), judge_dir)
        cfg = config({**overrides(args), "label": {"judge": {"type": "hf", "name": judge_dir}}})
        torch.set_num_threads(cfg.runtime.threads)
        spec = cfg.label.judge
        rows = read_jsonl(round_paths(rnd).samples)
        prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
        texts = [spec.template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        model, tok = models.load_reward_model(judge_dir).eval(), models.load_tokenizer(judge_dir)
        bare_scores = np.empty(len(texts))
        judge = make_judge(cfg)
        judge_scores: list = []
        by_length = np.argsort([len(t) for t in texts], kind="stable")

        def bare(order=by_length, loaded=None) -> None:
            rm, rm_tok = loaded or (models.load_reward_model(judge_dir).eval(), models.load_tokenizer(judge_dir))
            for start in range(0, len(texts), spec.batch_size):
                idx = order[start : start + spec.batch_size]
                batch = rm_tok(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=spec.max_length,
                    return_tensors="pt",
                )
                with torch.no_grad():
                    bare_scores[idx] = rm(**batch).logits[:, 0].numpy()

        sides = {
            "bare forward, unsorted": lambda: bare(np.arange(len(texts)), (model, tok)),
            "bare forward": lambda: bare(by_length, (model, tok)),
            "judge.score": lambda: judge_scores.append(judge.score(prompts, responses)),
            "bare forward + load": bare,
            "label step": lambda: label(cfg, rnd),
        }
        times = interleaved(sides, args.repeats)
        gap = float(np.abs(judge_scores[-1] - bare_scores).max())
        tokens = sum(len(tok(t)["input_ids"]) for t in texts)
    rate = {k: len(texts) / med(v) for k, v in times.items()}
    ratio = rate["label step"] / rate["bare forward + load"]
    rows = [[k, med(v), min(v), f"{rate[k]:.0f}"] for k, v in times.items()]
    text = (
        f"labelling: {len(texts)} samples ({tokens} tokens), judge batch {spec.batch_size}; largest score "
        f"difference judge vs bare {gap:.1e}\n"
        + table(["side", "median s", "min s", "samples/s"], rows)
        + f"\nsorting by length alone: {rate['bare forward'] / rate['bare forward, unsorted']:.3f}x"
        + f"\njudge.score / bare forward: {rate['judge.score'] / rate['bare forward']:.3f}x"
        + f"\nlabel step / bare forward + load: {verdict(ratio, TARGET, higher_is_better=True)}"
    )
    report(
        "labelling",
        args.out,
        text,
        {"times": times, "samples": len(texts), "ratio": ratio, "target": TARGET, "max_score_difference": gap},
    )


if __name__ == "__main__":
    main()
