"""Generation: the generate step against a bare `model.generate`, then the two sampling backends side by side.

1. The generate step's new tokens per second against a bare batched `model.generate`. Both sample the embedded
   default's label prompts (generate.k each) from the same SFT policy, with the same seed, batches and sampling
   params, so they must draw the same tokens (checked: the run fails otherwise), and both load the tokenizer, the
   policy and the prompts inside the timer; the step also decodes the responses and writes samples.jsonl.
   Target: the step keeps at least 0.9x the bare throughput.
2. `generate.backend`: HF `generate` against vLLM (the engine a round samples through, in .venv-vllm: `make
   install-vllm`) on the same rendered prompts, every sample exactly --new-tokens new tokens on both sides (the
   end of turn ignored; checked), at the tiny shape (the default's SFT policy) and at Qwen2-0.5B's shape
   (151,936 vocabulary rows, random weights, built locally), float32; new tokens per second and their ratio.
   The engine's start is timed apart (a step pays it once). Target: vLLM at least 5x HF at 0.5B on a GPU; a
   CPU is reported as measured. Skipped, saying so, where the vLLM environment is missing.
Takes about 10 minutes on 2 CPU cores (the first run also builds the project's SFT policy, a few minutes more).
"""

from __future__ import annotations

from pathlib import Path

from _common import (
    ROOT,
    chdir,
    config,
    default_project,
    interleaved,
    med,
    overrides,
    parser,
    quiet,
    report,
    table,
    verdict,
)
from _scale import QWEN2_05B

TARGET, VLLM_TARGET = 0.9, 5.0
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
# Per shape: prompts, samples per prompt; a batch of 16 at 0.5B keeps HF's side to a minute here.
WORK = {"tiny": (64, 4), "Qwen2-0.5B shape": (8, 2)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per sample in part 2 (default 64)")
    p.add_argument("--backends-only", action="store_true", help="part 2 only (bench/gpu_check.sh)")
    args = p.parse_args()
    quiet()
    if args.backends_only:
        text, result = backends(args, default_project(args.out))
        report("generation", args.out, text, {"backends": result})
        return
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
    if not same:
        raise SystemExit("generation: the step and the bare model.generate drew different tokens; nothing compared")
    rate = {k: tokens / med(v) for k, v in times.items()}
    ratio = rate["generate step"] / rate["bare model.generate"]
    rows = [[k, med(v), min(v), f"{rate[k]:.0f}"] for k, v in times.items()]
    text = (
        f"generation: {len(texts)} samples ({len(texts) // s.k} prompts x k={s.k}), {tokens} new tokens on each "
        f"side (the same tokens), batch {s.batch_size}, max_new_tokens {s.max_new_tokens}\n"
        + table(["side", "median s", "min s", "new tokens/s"], rows)
        + f"\nstep / bare throughput: {verdict(ratio, TARGET, higher_is_better=True)}"
    )
    result = {"times": times, "tokens": tokens, "ratio": ratio, "target": TARGET}
    if VLLM_PYTHON.is_file():
        backend_text, result["backends"] = backends(args, default_project(args.out))
        text += "\n\n" + backend_text
    else:
        text += f"\n\nbackends: not compared, no vLLM environment at {VLLM_PYTHON} (make install-vllm)"
    report("generation", args.out, text, result)


def backends(args, project: Path) -> tuple[str, dict]:
    """HF generate and vLLM on the same prompts, exactly args.new_tokens new tokens per sample on each side."""
    import platform

    import torch

    from rlhf.core.paths import SFT
    from tests.chat_models import answering_policy

    half_b = args.out / "qwen2-0.5b-policy"
    if not (half_b / "config.json").is_file():
        answering_policy(half_b, 151_936, QWEN2_05B, args.new_tokens)
    with chdir(project):
        from rlhf.core.prompts import read_prompts

        cfg = config({"generate": {"vllm_python": str(VLLM_PYTHON), "vllm_memory": 0.25}})
        prompts = [p["prompt"] for p in read_prompts(cfg.prompts.label)]
    rows, result = [], {}
    for shape, folder in (("tiny", project / SFT.policy), ("Qwen2-0.5B shape", half_b)):
        n_prompts, k = WORK[shape]
        result[shape] = one_shape(cfg, folder, prompts[:n_prompts], k, args.new_tokens, args.repeats)
        rate = {side: result[shape]["tokens"] / med(t) for side, t in result[shape]["times"].items()}
        rows += [[shape, side, med(t), f"{rate[side]:.0f}"] for side, t in result[shape]["times"].items()]
        start = result[shape]["engine_start_s"]
        rows.append([shape, "vLLM / HF", "", f"{result[shape]['ratio']:.2f}x (engine start {start:.0f} s)"])
    n = args.new_tokens
    device = "GPU" if torch.cuda.is_available() else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    text = (
        f"backends on {device}: {n} new tokens per sample on both sides (end of turn ignored, counts checked)\n"
        + table(["shape", "side", "median s", "new tokens/s"], rows)
        + f"\nvLLM / HF at 0.5B: {result['Qwen2-0.5B shape']['ratio']:.2f}x (target {VLLM_TARGET}x on a GPU)"
    )
    return text, result


def one_shape(cfg, folder: Path, prompts: list, k: int, n: int, repeats: int) -> dict:
    """Both backends on one policy folder: k samples of each prompt (rendered by the policy's own template),
    n new tokens each; times, tokens, ratio."""
    import time

    import torch

    from rlhf.ml import chat, models
    from rlhf.ml.sampler import Engine

    tok, model = models.load_tokenizer(folder, "left"), models.load_policy(folder, models.device(cfg)).eval()
    texts = chat.render(tok, prompts)
    ids = tok(texts)["input_ids"]

    def hf() -> None:
        batch = tok(texts, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            seqs = model.generate(**batch, do_sample=True, num_return_sequences=k, min_new_tokens=n, max_new_tokens=n)
        assert seqs.shape == (len(texts) * k, batch["input_ids"].shape[1] + n), seqs.shape

    def vllm() -> None:
        params = [
            dict(n=k, seed=i, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False) for i in range(len(ids))
        ]
        out = engine.call("generate", {"prompts": ids, "params": params, "lora": None})
        assert [len(c[0]) for r in out for c in r] == [n] * (len(texts) * k)

    start = time.perf_counter()
    engine = Engine.start(cfg, str(folder), "float32", {})
    started = time.perf_counter() - start
    try:
        times = interleaved({"HF generate": hf, "vLLM": vllm}, repeats)
    finally:
        engine.close()
    tokens = len(texts) * k * n
    ratio = med(times["HF generate"]) / med(times["vLLM"])
    return {"times": times, "tokens": tokens, "ratio": ratio, "engine_start_s": started}


if __name__ == "__main__":
    main()
