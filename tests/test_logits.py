"""Vocabulary-wide work in bounded memory (rlhf/ml/logits.py): the same numbers as from the model's full logits,
whatever the chunk size, on every architecture's head, and a peak that stays flat as the vocabulary grows."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from rlhf.core.errors import UserError
from rlhf.ml import logits, sampling

VOCAB = 50


def tiny(kind: str = "llama", vocab: int = VOCAB, seed: int = 0, **extra):
    """An untrained causal LM of `kind` (its head's quirks: Gemma 2's soft-cap, Cohere's logit scale, Granite's
    logit divisor, GPT-NeoX's untied output layer)."""
    import transformers as tf

    torch.manual_seed(seed)
    shape = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    cls, cfg = {
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**shape, num_key_value_heads=2, initializer_range=0.2)),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**shape, num_key_value_heads=2, tie_word_embeddings=True)),
        "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**shape, tie_word_embeddings=False)),
        "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config(**shape, head_dim=8, final_logit_softcapping=2.0)),
        "cohere": (tf.CohereForCausalLM, tf.CohereConfig(**shape, logit_scale=0.25)),
        "granite": (tf.GraniteForCausalLM, tf.GraniteConfig(**shape, logits_scaling=4.0)),
    }[kind]
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cls(cfg).eval()


def batch(vocab: int = VOCAB, rows: int = 3, seed: int = 1):
    """Right-padded rows of different prompt and response lengths, as sampling.pack makes them."""
    g = torch.Generator().manual_seed(seed)
    start, length = torch.tensor([2, 5, 3])[:rows], torch.tensor([6, 2, 4])[:rows]
    width = int((start + length).max())
    ids = torch.randint(1, vocab, (rows, width), generator=g)
    attn = (torch.arange(width) < (start + length)[:, None]).long()
    return ids * attn, attn, start, length


def full_logprobs(model, ids, attn, start, length, temperature=1.0):
    """Today's way: every position's logits, the response's picked, a log-softmax of each."""
    pos, mask = sampling.response_positions(start, length)
    pos = pos.clamp(max=ids.shape[1] - 1)
    out = model(input_ids=ids, attention_mask=attn).logits.float() / temperature
    picked = torch.log_softmax(out.gather(1, (pos - 1)[..., None].expand(-1, -1, out.shape[-1])), -1)
    return picked.gather(-1, ids.gather(1, pos)[..., None])[..., 0] * mask, picked, mask


@pytest.fixture(params=[None, 1], ids=["one chunk", "a token a chunk"])
def budget(request, monkeypatch):
    """The default budget, and one so small that every token is a chunk of its own."""
    if request.param:
        monkeypatch.setattr(logits, "_budget", request.param)
    return request.param


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt_neox", "gemma2", "cohere", "granite"])
def test_the_head_gives_the_models_own_logits(kind):
    model, (ids, attn, _, _) = tiny(kind), batch()
    h = logits.head(model, ids, attn)  # checked against the forward on its first tokens: no error
    with torch.no_grad():
        assert torch.allclose(h(h.hidden(ids, attn)), model(input_ids=ids, attention_mask=attn).logits, atol=1e-5)


def test_an_architecture_whose_forward_does_more_to_its_logits_is_refused_in_one_line():
    from transformers import LlamaForCausalLM

    class Shifted(LlamaForCausalLM):  # what no config attribute says: the head would silently differ
        def forward(self, *a, **kw):
            out = super().forward(*a, **kw)
            out.logits = out.logits + torch.arange(out.logits.shape[-1])
            return out

    model, (ids, attn, start, length) = Shifted(tiny().config).eval(), batch()
    with pytest.raises(UserError, match="Shifted: its forward does more to the logits"):
        sampling.response_logprobs(model, ids, attn, start, length, grad=False)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_equal_the_full_logits_whatever_the_chunk(budget, temperature):
    model, packed = tiny(), batch()
    want, _, want_mask = full_logprobs(model, *packed, temperature)
    got, mask = sampling.response_logprobs(model, *packed, grad=False, temperature=temperature)
    assert torch.equal(mask, want_mask)
    assert torch.allclose(got, want, atol=1e-6)


def test_the_gradient_through_chunks_equals_the_full_logits_gradient(budget):
    """PPO's loss: checkpointed chunks give the gradient of the whole at every weight, the head's included."""
    model, packed = tiny(), batch()
    want = full_logprobs(model, *packed)[0].sum()
    want.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = sampling.response_logprobs(model, *packed, grad=True)[0].sum()
    got.backward()
    assert float(got) == pytest.approx(float(want), abs=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-5), name


def test_a_lora_policy_scores_with_its_adapter(budget):
    from peft import LoraConfig, get_peft_model

    base, packed = tiny(), batch()
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    want = full_logprobs(model, *packed)[0]
    assert not torch.allclose(want, full_logprobs(tiny(), *packed)[0], atol=1e-3)  # the adapter changes them
    assert torch.allclose(sampling.response_logprobs(model, *packed, grad=False)[0], want, atol=1e-6)


def test_token_kl_equals_the_kl_of_the_full_distributions(budget):
    policy, ref, packed = tiny(seed=0), tiny(seed=2), batch()
    logp, p, mask = full_logprobs(policy, *packed)
    logq, q, _ = full_logprobs(ref, *packed)
    pos, _ = sampling.response_positions(packed[2], packed[3])
    kl, mine, theirs = logits.token_kl(policy, ref, packed[0], packed[1], pos, mask)
    assert torch.allclose(kl, (p.exp() * (p - q)).sum(-1).clamp(min=0) * mask, atol=1e-6)
    assert torch.allclose(mine, logp, atol=1e-6) and torch.allclose(theirs, logq, atol=1e-6)


def test_trl_tiles_are_sized_from_the_budget():
    """DPO, RLOO and SFT project through TRL's fused head: its tiles shrink with the budget (TRL's names are
    checked here, so an upgrade that renames them fails this test rather than the budget silently)."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trainer_utils

    vocab_chunk = trainer_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    before = kernel.TOKEN_CHUNK_SIZE
    try:
        logits.size_trl_tiles(256 * 2**20)
        assert kernel.TOKEN_CHUNK_SIZE * vocab_chunk * 4 * logits.TRL_COPIES <= 256 * 2**20
        assert kernel.TOKEN_CHUNK_SIZE > 128
    finally:
        kernel.TOKEN_CHUNK_SIZE = before


# The KL of 8 responses of 256 tokens, as evaluate computes it, in a process of its own: its peak resident memory
# above what the models and the batch took before.
PEAK = textwrap.dedent(
    """
    import json, sys, torch
    from tests.test_logits import tiny
    from rlhf.ml import logits, sampling
    logits.set_budget(128)
    torch.set_num_threads(1)
    vocab = int(sys.argv[1])
    policy, ref = tiny("qwen2", vocab, 0), tiny("qwen2", vocab, 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (8, 300), generator=g)
    attn, start, length = torch.ones_like(ids), torch.full((8,), 44), torch.full((8,), 256)
    pos, mask = sampling.response_positions(start, length)
    policy(input_ids=ids[:1, :8]); ref(input_ids=ids[:1, :8])
    def peak():  # this process's own high-water mark (ru_maxrss would start at its parent's, kept across exec)
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    before = peak()
    kl = logits.token_kl(policy, ref, ids, attn, pos, mask)[0]
    after = peak()
    print(json.dumps({"mb": (after - before) / 1024, "kl": float(kl.sum())}))
    """
)


def test_the_kl_peak_stays_flat_from_600_to_151936_vocabulary_rows():
    """The same 2,048 tokens' exact KL at a 600-row and a Qwen2-size vocabulary: 6 vocabulary-wide float32 copies
    of the whole batch would be 7.5 GB at 151,936 rows; in chunks the peak grows by about the budget (128 MB;
    measured: 125-135 MB)."""
    peaks = {}
    for vocab in (600, 151_936):
        out = subprocess.run([sys.executable, "-c", PEAK, str(vocab)], capture_output=True, text=True, check=True)
        peaks[vocab] = json.loads(out.stdout.splitlines()[-1])
        assert peaks[vocab]["kl"] > 0
    assert peaks[151_936]["mb"] < peaks[600]["mb"] + 128 + 32, peaks  # the budget, and room for the rest
