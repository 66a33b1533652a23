"""The core math against independent reference computations: what every study's numbers rest on.

Each test compares the library with a computation written another way (one token at a time on the
unpadded text, a brute-force sum over every response of a tiny vocabulary, numbers worked by hand), so
that a slip which keeps the code self-consistent (an off-by-one position, a flipped sign, a swapped KL
direction, gamma for lambda, chosen for rejected, a dropped temperature) fails here. `make mutants`
(tests/mutations.py) checks that each of those slips is caught. Tiny models, seconds in all.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from rlhf.core.config import PPO, Sampling
from rlhf.ml import logits, models, sampling
from rlhf.ml.methods import ppo
from rlhf.ml.sampling import Samples

EOS = 1  # build_tokenizer's ids: <pad> 0, <eos> 1, <unk> 2, then the words: a 3, b 4, c 5
VOCAB = 6


@functools.cache
def tok():
    return models.build_tokenizer(["a b c"])


def config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        eos_token_id=EOS,
        bos_token_id=None,
        tie_word_embeddings=False,
        initializer_range=0.15,  # next-token distributions neither uniform nor one-hot
        **kw,
    )


def tiny_lm(seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config()).eval()


def next_token_logprobs(model, prefix: list[int], temperature: float = 1.0) -> torch.Tensor:
    """The reference: log p(. | prefix) from the unpadded prefix alone, a batch of one, its last logits
    (no packing, no attention mask, no gather)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix])).logits[0, -1].double()
    return torch.log_softmax(logits / temperature, -1)


def prompt_ids(prompt: str) -> list[int]:
    return tok()(prompt)["input_ids"]


# --- response log-probabilities ----------------------------------------------------------------------

# Rows of different prompt and response lengths, so that one batch has right padding of both.
PROMPTS = ["a", "b c a b", "c a"]
RESPONSES = [[4, 5, 3, EOS], [5], [3, 3]]


def test_response_logprobs_match_scoring_one_token_at_a_time():
    """PPO's ratio and KL, ReST and evaluate rest on this: each response token's log-prob is that of the
    next-token distribution after the prompt and the response so far (not after the token itself),
    whatever padding its row has in the batch; beyond a row's end the log-prob is 0 and the mask false."""
    model = tiny_lm(0)
    ids, attn, start, length = sampling.pack(tok(), PROMPTS, RESPONSES)
    logp, mask = sampling.response_logprobs(model, ids, attn, start, length, grad=False)
    assert logp.shape == (3, 4)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        for j, token in enumerate(response):
            expected = next_token_logprobs(model, prompt_ids(prompt) + response[:j])[token]
            assert float(logp[row, j]) == pytest.approx(float(expected), abs=1e-5), (row, j)
        assert mask[row].tolist() == [True] * len(response) + [False] * (4 - len(response))
        assert (logp[row, len(response) :] == 0).all()


def test_response_logprobs_at_a_temperature_are_those_of_the_distribution_sampled():
    """Responses sampled at temperature T come from softmax(logits / T): their log-probs (PPO's ratio and
    KL penalty) must be of that distribution, or the ratio is not 1 before any update."""
    model = tiny_lm(0)
    packed = sampling.pack(tok(), PROMPTS, RESPONSES)
    logp, _ = sampling.response_logprobs(model, *packed, grad=False, temperature=0.7)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        for j, token in enumerate(response):
            expected = next_token_logprobs(model, prompt_ids(prompt) + response[:j], temperature=0.7)[token]
            assert float(logp[row, j]) == pytest.approx(float(expected), abs=1e-5), (row, j)
    plain, _ = sampling.response_logprobs(model, *packed, grad=False)
    assert not torch.allclose(logp, plain, atol=1e-3)  # the temperature changes them


# --- the sequence KL against a brute-force sum ---------------------------------------------------------

MAX_LEN = 3


def every_response() -> list[list[int]]:
    """Every response of at most MAX_LEN tokens of the 6-token vocabulary: a response ends at its first
    <eos>, or is cut at MAX_LEN (156 in all)."""
    out = []
    for n in range(1, MAX_LEN + 1):
        for seq in itertools.product(range(VOCAB), repeat=n):
            if EOS not in seq[:-1] and (n == MAX_LEN or seq[-1] == EOS):
                out.append(list(seq))
    return out


class Enumerated:
    """A model's distribution over every response of one prompt, by brute force: the next-token
    distribution at each prefix (31 of them), each computed once on the unpadded text."""

    def __init__(self, model, prompt: str):
        self.model, self.prompt = model, prompt_ids(prompt)

    @functools.cache  # noqa: B019 (a few short-lived instances per test)
    def next(self, prefix: tuple[int, ...]) -> torch.Tensor:
        return next_token_logprobs(self.model, self.prompt + list(prefix))

    def logprob(self, response: list[int]) -> float:
        return sum(float(self.next(tuple(response[:j]))[t]) for j, t in enumerate(response))


def exact_kl(p: Enumerated, q: Enumerated, responses) -> float:
    """KL(P || Q) = sum over every response y of P(y) log(P(y) / Q(y))."""
    return sum(math.exp(p.logprob(y)) * (p.logprob(y) - q.logprob(y)) for y in responses)


def per_position_kl(p: Enumerated, q: Enumerated, y: list[int]) -> float:
    """Sum over y's positions of the exact KL between the two next-token distributions there."""
    total = 0.0
    for j in range(len(y)):
        lp, lq = p.next(tuple(y[:j])), q.next(tuple(y[:j]))
        total += float((lp.exp() * (lp - lq)).sum())
    return total


KL_PROMPTS = ["a", "b c a"]


def code_kl(first, second):
    """sampling.sequence_kl(first, second) on every response of each prompt, in batches that mix lengths."""
    responses = every_response()
    samples = Samples(
        prompt_index=[i for i in range(len(KL_PROMPTS)) for _ in responses],
        responses=[""] * (len(KL_PROMPTS) * len(responses)),
        response_ids=[y for _ in KL_PROMPTS for y in responses],
        finished=[y[-1] == EOS for _ in KL_PROMPTS for y in responses],
    )
    kl, ratio, n = sampling.sequence_kl(first, second, tok(), KL_PROMPTS, samples, batch_size=64)
    split = lambda x: x.double().reshape(len(KL_PROMPTS), len(responses))  # noqa: E731
    return responses, split(kl), split(ratio), split(n)


@pytest.mark.parametrize("direction", ["KL(policy||ref)", "KL(ref||policy)"])
def test_sequence_kl_is_the_exact_kl_of_the_response_distributions(direction):
    """evaluate's KL: per response, the exact per-position KL summed over the response, and the sampled
    log-ratio; averaged over responses drawn from the first model, both are the sequence KL, here summed
    exactly over every response of a tiny vocabulary (of every length up to 3, so batches are padded)."""
    policy, ref = tiny_lm(1), tiny_lm(2)
    first, second = (policy, ref) if direction == "KL(policy||ref)" else (ref, policy)
    responses, kl, ratio, n = code_kl(first, second)
    for i, prompt in enumerate(KL_PROMPTS):
        p, q = Enumerated(first, prompt), Enumerated(second, prompt)
        weight = torch.tensor([math.exp(p.logprob(y)) for y in responses], dtype=torch.float64)
        assert float(weight.sum()) == pytest.approx(1, abs=1e-9)  # every response enumerated once
        assert n[i].tolist() == [len(y) for y in responses]
        # per response: the log-ratio of its tokens, and the exact KL at each of its positions
        assert ratio[i].tolist() == pytest.approx([p.logprob(y) - q.logprob(y) for y in responses], abs=1e-4)
        assert kl[i].tolist() == pytest.approx([per_position_kl(p, q, y) for y in responses], abs=1e-4)
        # the expectation over the first model's responses is the exact sequence KL
        exact = exact_kl(p, q, responses)
        assert float((weight * kl[i]).sum()) == pytest.approx(exact, rel=1e-4)
        assert float((weight * ratio[i]).sum()) == pytest.approx(exact, rel=1e-4)


def test_sequence_kl_tells_kl_policy_ref_from_kl_ref_policy():
    """The KL a study reports is KL(policy || ref); on these models KL(ref || policy) is about half of it
    (2.50 against 1.39 nats): the code's estimate, weighted by the policy's probabilities, is the first."""
    policy, ref = tiny_lm(1), tiny_lm(2)
    responses, kl, _, _ = code_kl(policy, ref)
    p, q = Enumerated(policy, KL_PROMPTS[0]), Enumerated(ref, KL_PROMPTS[0])
    forward, reverse = exact_kl(p, q, responses), exact_kl(q, p, responses)
    assert abs(forward - reverse) > 0.2 * forward  # the two directions differ clearly on these models
    weight = torch.tensor([math.exp(p.logprob(y)) for y in responses], dtype=torch.float64)
    estimate = float((weight * kl[0]).sum())
    assert estimate == pytest.approx(forward, rel=1e-4)
    assert estimate != pytest.approx(reverse, rel=0.1)


def test_categorical_kl_in_both_directions_against_hand_computed_values():
    """categorical_kl(logp, logq) is KL(p || q) = sum p log(p/q), not KL(q || p)."""
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.2, 0.3, 0.5])
    forward = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.5)  # 0.6544
    reverse = 0.2 * math.log(0.2 / 0.7) + 0.3 * math.log(0.3 / 0.2) + 0.5 * math.log(0.5 / 0.1)  # 0.6762...
    assert float(logits.categorical_kl(p.log(), q.log())) == pytest.approx(forward, rel=1e-6)
    assert float(logits.categorical_kl(q.log(), p.log())) == pytest.approx(reverse, rel=1e-6)
    peaked, flat = torch.tensor([0.97, 0.01, 0.01, 0.01]), torch.full((4,), 0.25)
    kl_peaked = sum(a * math.log(a / 0.25) for a in peaked.tolist())  # 1.2180: mode-seeking direction
    kl_flat = sum(0.25 * math.log(0.25 / a) for a in peaked.tolist())  # 2.4361
    assert float(logits.categorical_kl(peaked.log(), flat.log())) == pytest.approx(kl_peaked, rel=1e-6)
    assert float(logits.categorical_kl(flat.log(), peaked.log())) == pytest.approx(kl_flat, rel=1e-6)


# --- PPO ----------------------------------------------------------------------------------------------


def fixed_samples(response_ids, finished):
    """A `sample` for ppo.rollout that returns these responses, one per prompt."""
    return lambda prompts, k, s: Samples(list(range(len(prompts))), [""] * len(prompts), response_ids, finished)


def test_ppo_kl_penalty_sign_and_size_on_hand_made_log_probs(monkeypatch):
    """The per-token reward is r_t = -beta (log pi(y_t) - log pi_ref(y_t)), the RM's score added at the
    response's last token: negative where the policy puts more mass than the reference on its sampled
    token, positive where less. With gamma = lambda = 1, unwhitened, and zero values, the returns are the
    rewards to go, so r_t = R_t - R_{t+1}."""
    policy, ref = object(), object()  # stand-ins: rollout sees them only through their log-probs below
    p_tok = torch.tensor([[0.8, 0.5, 0.9], [0.6, 0.3, 1.0]])  # policy's probability of each sampled token
    r_tok = torch.tensor([[0.4, 0.5, 0.3], [0.2, 0.6, 1.0]])  # the reference's; row 2 has 2 tokens
    log = {policy: p_tok.log(), ref: r_tok.log()}

    def logprobs(model, ids, attn, start, length, *args, **kw):
        _, mask = sampling.response_positions(start, length)
        return log[model][:, : mask.shape[1]] * mask, mask

    monkeypatch.setattr(sampling, "response_logprobs", logprobs)
    monkeypatch.setattr(ppo, "values_of", lambda model, ids, attn, start, length, grad=True: torch.zeros(len(ids), 3))
    p = PPO(gamma=1.0, lam=1.0, whiten=False)
    sample = fixed_samples([[3, 4, EOS], [4, EOS]], [True, True])
    r = ppo.rollout(policy, ref, None, tok(), ["a", "b"], lambda *a: [2.0, -1.0], p, 1, Sampling(), 0.1, 2, sample)
    rewards = r.returns - torch.nn.functional.pad(r.returns[:, 1:], (0, 1))
    beta = 0.1
    expected = [
        [-beta * math.log(2), 0.0, -beta * math.log(3) + 2.0],  # twice, equal, three times the mass; score 2
        [-beta * math.log(3), -beta * math.log(0.5) - 1.0, 0.0],  # less mass than the ref: a bonus; score -1
    ]
    assert rewards.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    assert rewards[0, 0] < 0 and rewards[1, 0] < 0  # more mass than the reference: penalised
    assert r.stats["kl"] == pytest.approx((math.log(6) + math.log(1.5)) / 2)  # mean over rows of the sum: log 3


def test_ppo_kl_penalty_on_tiny_models_at_the_sampling_temperature():
    """The same rewards from real models: the log-probs of the policy and of the reference (not swapped)
    at the temperature the rollout was sampled at, scored one token at a time."""
    from transformers import LlamaForSequenceClassification

    policy, ref = tiny_lm(1), tiny_lm(2)
    torch.manual_seed(0)
    value = LlamaForSequenceClassification(config(num_labels=1)).eval()
    responses = [[3, 4, 5, EOS], [5, EOS], [4, 4, EOS]]
    sample = fixed_samples(responses, [True] * 3)
    p, beta, scores = PPO(gamma=1.0, lam=1.0, whiten=False), 0.3, [1.5, -1.0, 0.5]
    s = Sampling(temperature=0.7)
    r = ppo.rollout(policy, ref, value, tok(), PROMPTS, lambda *a: scores, p, 1, s, beta, 2, sample)
    rewards = r.returns - torch.nn.functional.pad(r.returns[:, 1:], (0, 1))
    for row, (prompt, response) in enumerate(zip(PROMPTS, responses)):
        for j, token in enumerate(response):
            prefix = prompt_ids(prompt) + response[:j]
            log_ratio = next_token_logprobs(policy, prefix, 0.7)[token] - next_token_logprobs(ref, prefix, 0.7)[token]
            expected = -beta * float(log_ratio) + (scores[row] if j == len(response) - 1 else 0.0)
            assert float(rewards[row, j]) == pytest.approx(expected, abs=1e-5), (row, j)


def test_ppo_value_loss_steps_reduce_the_value_error():
    """A few optimiser steps on ppo_step's loss move the value model's estimates toward the returns (the
    policy term is 0 here: zero advantages)."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    value = LlamaForSequenceClassification(config(num_labels=1)).eval()
    policy = tiny_lm(0).requires_grad_(False)
    p = PPO(gamma=1.0, lam=0.95, whiten=False, value_clip=100.0, value_coef=1.0)
    sample = fixed_samples([[3, 4, 5, EOS], [5, 3], [4]], [True, False, False])
    scores = lambda *a: [1.5, -1.0, 0.5]  # noqa: E731
    r = ppo.rollout(policy, policy, value, tok(), PROMPTS, scores, p, 1, Sampling(), 0.0, 3, sample)
    r.advantages.zero_()
    rows = torch.arange(3)

    def error() -> float:
        v = ppo.values_of(value, r.ids, r.attn, r.start, r.length, grad=False)
        return float(((v - r.returns).abs() * r.mask).sum() / r.mask.sum())

    before = error()
    assert before == pytest.approx(float(((r.values - r.returns).abs() * r.mask).sum() / r.mask.sum()), abs=1e-5)
    opt = torch.optim.Adam(value.parameters(), lr=1e-2)
    for _ in range(25):
        loss, _ = ppo.ppo_step(policy, value, r, rows, p)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert error() < 0.3 * before, (before, error())


def test_whiten_against_hand_computed_values_and_equal_advantages_give_zeros_not_nan():
    """Advantages are standardised over the real tokens only (the padded 100 counts for nothing); a batch
    whose advantages are all equal (say, every response scored alike) whitens to zeros, not NaN."""
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # real tokens 1, 3, 5: mean 3, variance (4 + 0 + 4) / 3 = 8/3, so (-2, 0, 2) / sqrt(8/3) = (-1.2247, 0, 1.2247)
    got = ppo.whiten(torch.tensor([[1.0, 3.0], [5.0, 100.0]]), mask)
    assert got.tolist() == [pytest.approx([-1.224745, 0.0], abs=1e-5), pytest.approx([1.224745, 0.0], abs=1e-5)]
    flat = ppo.whiten(torch.full((2, 2), 0.5), mask)
    assert torch.isfinite(flat).all() and (flat == 0).all()


def test_gae_against_a_hand_worked_example_with_gamma_not_lambda():
    """GAE: delta_t = r_t + gamma V_{t+1} - V_t (no V beyond a row's last token), A_t = delta_t +
    gamma lambda A_{t+1}, returns A + V; row 2 is shorter, its padding (9s) must not leak in."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 1: deltas 0 + .9*.2 - .1 = .08, 0 + .9*.3 - .2 = .07, 1 - .3 = .7; gamma*lambda = .45
    #        A_2 = .7, A_1 = .07 + .45*.7 = .385, A_0 = .08 + .45*.385 = .25325
    # row 2: deltas .5 + .9*.5 - .4 = .55, 2 - .5 = 1.5; A_1 = 1.5, A_0 = .55 + .45*1.5 = 1.225
    assert adv.tolist() == [pytest.approx([0.25325, 0.385, 0.7]), pytest.approx([1.225, 1.5, 0.0])]
    assert ret.tolist() == [pytest.approx([0.35325, 0.585, 1.0]), pytest.approx([1.625, 2.0, 0.0])]


# --- reward-model objectives --------------------------------------------------------------------------

PREFERENCE = {"a": 0.5, "b": 2.0, "c": -1.0}  # the hand-made reward of each response word (head 1)
ABSOLUTE = {"a": 0.2, "b": 0.7, "c": 0.4}  # the absolute head's (the combined objective's head 2)
PAIRS = [  # margin: chosen_gold - rejected_gold, as label writes it
    {"prompt": "a", "chosen": " b", "rejected": " c", "chosen_gold": 0.9, "rejected_gold": 0.1, "margin": 0.8},
    {"prompt": "a", "chosen": " a", "rejected": " b", "chosen_gold": 0.6, "rejected_gold": 0.3, "margin": 0.3},
    {"prompt": "a", "chosen": " c", "rejected": " b", "chosen_gold": 0.8, "rejected_gold": 0.2, "margin": 0.6},
]
GOLD = ("chosen_gold", "rejected_gold")


class HandMadeRM(torch.nn.Module):
    """Rewards each row by its response word (the token after the one-word prompt): one head per table."""

    def __init__(self, *tables: dict):
        super().__init__()
        self.tables = tables

    def forward(self, input_ids, attention_mask=None, **kw):
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        words = tok().convert_ids_to_tokens(input_ids[:, 1].tolist())
        return SequenceClassifierOutputWithPast(logits=torch.tensor([[t[w] for t in self.tables] for w in words]))


def rm_loss(objective: str, tables: tuple[dict, ...], tmp_path, pairs=PAIRS) -> float:
    """The loss ObjectiveRewardTrainer computes on `pairs`, batched by its own collator, with the hand-made
    rewards; the columns are those tasks/train_rm.py passes for the objective."""
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig

    from rlhf.ml.rm_objectives import ObjectiveRewardTrainer

    cols = {"bt": (), "bt_margin": ("margin",), "absolute": GOLD, "combined": GOLD}[objective]
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected", *cols)} for p in pairs])
    args = RewardConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", activation_checkpointing=False
    )
    rm = LlamaForSequenceClassification(config(num_labels=len(tables))).eval()
    trainer = ObjectiveRewardTrainer(
        model=rm, args=args, train_dataset=data, processing_class=tok(), objective=objective
    )
    assert rm.config.num_labels == len(tables)  # the combined RM keeps both heads past TRL's one-head check
    [batch] = list(trainer.get_train_dataloader())
    with torch.no_grad():
        loss = float(trainer.compute_loss(HandMadeRM(*tables), dict(batch)))
        again, outputs = trainer.compute_loss(HandMadeRM(*tables), dict(batch), return_outputs=True)  # evaluation's
    assert float(again) == loss and outputs["logits"].shape == (2 * len(pairs), len(tables))
    return loss


def nls(x: float) -> float:
    """-log sigmoid(x), written out."""
    return math.log(1 + math.exp(-x))


# Preference rewards: b 2.0, a 0.5, c -1.0. Pair 1 (b over c) the RM has right, pairs 2 (a over b) and
# 3 (c over b) wrong; chosen minus rejected: 3, -1.5, -3.
BT = (nls(3.0) + nls(-1.5) + nls(-3.0)) / 3  # 1.5995; chosen and rejected swapped: 1.0995
BT_MARGIN = (nls(3.0 - 0.8) + nls(-1.5 - 0.3) + nls(-3.0 - 0.6)) / 3
# The absolute head's rows, chosen then rejected: b a c, c b b -> .7 .2 .4, .4 .7 .7 against gold .9 .6 .8, .1 .3 .2
MSE = (0.2**2 + 0.4**2 + 0.4**2 + 0.3**2 + 0.4**2 + 0.5**2) / 6  # 0.1433; gold swapped: 0.1133


@pytest.mark.parametrize(
    "objective, tables, expected",
    [
        ("bt", (PREFERENCE,), BT),
        ("bt_margin", (PREFERENCE,), BT_MARGIN),
        ("absolute", (ABSOLUTE,), MSE),
        ("combined", (PREFERENCE, ABSOLUTE), MSE + BT),  # MSE on the absolute head, BT on the preference head
    ],
    ids=["bt", "bt_margin", "absolute", "combined"],
)
def test_rm_objectives_on_hand_made_rewards(objective, tables, expected, tmp_path):
    """What each train_rm.objective minimises, on rewards chosen by hand: swapping chosen and rejected
    (or their gold scores) changes every one of these numbers."""
    assert rm_loss(objective, tables, tmp_path) == pytest.approx(expected, rel=1e-6)


def test_rm_objective_on_a_batch_of_one_pair(tmp_path):
    """An epoch's last batch may hold a single pair: b (.7) against gold .9, c (.4) against gold .1."""
    assert rm_loss("absolute", (ABSOLUTE,), tmp_path, PAIRS[:1]) == pytest.approx((0.2**2 + 0.3**2) / 2)
