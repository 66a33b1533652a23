"""Generation: the generate step's new tokens per second against a bare batched `model.generate`.

Both sample the embedded default's label prompts (generate.k each) from the same SFT policy, with the same
seed, batches and sampling params, so they draw the same tokens (checked). Both load the tokenizer, the
policy and the prompts inside the timer; the step also decodes the responses and writes samples.jsonl.
Target: the step keeps at least 0.9x the bare throughput.
Takes about 3 minutes on 2 CPU cores (the first run also builds the project's SFT policy, a few minutes more).
"""

from __future__ import annotations

from _common import chdir, config, default_project, interleaved, med, overrides, parser, quiet, report, table, verdict

TARGET = 0.9


def main() -> None:
    args = parser(__doc__).parse_args()
    quiet()
    with chdir(default_project(args.out)):
        import torch

        from rlhf.core.io import read_jsonl
        from rlhf.core.paths import SFT, round_paths
        from rlhf.core.prompts import read_prompts
        from rlhf.core.seeds import stage_seed
        from rlhf.ml import chat, models
        from tasks.generate import generate

        cfg, rnd = config(overrides(args)), "r01"
        s = cfg.generate
        torch.set_num_threads(cfg.runtime.threads)
        bare_out: list[list[int]] = []
        texts: list[str] = []

        def bare() -> None:  # loads what the step loads, inside the timer as the step does
            tok, model = models.load_tokenizer(SFT.policy, "left"), models.load_policy(SFT.policy).eval()
            rendered = chat.render(tok, [p["prompt"] for p in read_prompts(cfg.prompts.label)])
            texts[:] = [t for t in rendered for _ in range(s.k)]
            bare_out.clear()
            torch.manual_seed(stage_seed(cfg, "generate", rnd))  # the step's own seed
            for start in range(0, len(texts), s.batch_size):
                batch = tok(texts[start : start + s.batch_size], return_tensors="pt", padding=True)
                with torch.no_grad():
                    seqs = model.generate(
                        **batch,
                        do_sample=True,
                        temperature=s.temperature,
                        top_k=s.top_k or None,
                        top_p=s.top_p,
                        max_new_tokens=s.max_new_tokens,
                        pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id,
                    )
                for ids in seqs[:, batch["input_ids"].shape[1] :].tolist():  # up to and with the first eos
                    bare_out.append(ids[: ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids)

        times = interleaved({"bare model.generate": bare, "generate step": lambda: generate(cfg, rnd)}, args.repeats)
        tok = models.load_tokenizer(SFT.policy)
        tokens = sum(map(len, bare_out))
        bare_text = [t for t in tok.batch_decode(bare_out, skip_special_tokens=True)]
        step_text = [r["response"].strip() for r in read_jsonl(round_paths(rnd).samples)]
        same = [b.strip() for b in bare_text] == step_text
    rate = {k: tokens / med(v) for k, v in times.items()}
    ratio = rate["generate step"] / rate["bare model.generate"]
    rows = [[k, med(v), min(v), f"{rate[k]:.0f}"] for k, v in times.items()]
    text = (
        f"generation: {len(texts)} samples ({len(texts) // s.k} prompts x k={s.k}), {tokens} new tokens, "
        f"batch {s.batch_size}, max_new_tokens {s.max_new_tokens}; same tokens on both sides: {same}\n"
        + table(["side", "median s", "min s", "new tokens/s"], rows)
        + f"\nstep / bare throughput: {verdict(ratio, TARGET, higher_is_better=True)}"
    )
    report(
        "generation",
        args.out,
        text,
        {"times": times, "tokens": tokens, "same_tokens": same, "ratio": ratio, "target": TARGET},
    )


if __name__ == "__main__":
    main()
