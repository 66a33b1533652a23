"""The one config object: params.yaml, loaded and validated once, a typed section per step.

An unknown key, a wrong type or an impossible value raises UserError naming the key, e.g.
`params.yaml: train_rm.epochs: must be greater than 0 (got 0)`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf.core.errors import UserError


def d(default, description: str, **constraints):
    """A params key: its default, its one description (the docs' params reference is generated from it) and
    its constraints."""
    return Field(default, description=description, **constraints)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Runtime(Section):
    """How every stage runs: seeds, threads, device, and several processes for the training steps."""

    seed: int = d(0, "base of every stage's own seed (each stage derives its seed from it and its name)")
    threads: int = d(2, "torch threads per stage, fixed because 1 and 2 threads give different weights", ge=1)
    device: Literal["auto", "cpu", "cuda"] = d("auto", "where models run; auto: a GPU if one is visible")
    num_processes: int = d(
        1,
        "> 1: prepare, train_rm and update_policy run as that many ranks under `accelerate "
        "launch`, batch sizes staying global (docs/scaling.md); several nodes count every "
        "node's processes",
        ge=1,
    )
    accelerate_config: str | None = d(None, "an `accelerate config`, DeepSpeed or FSDP file for that launch")
    activation_checkpointing: bool = d(
        False,
        "training steps recompute each layer's activations in the backward pass instead of keeping them, so their "
        "memory stops growing with batch x length x layers, for about a third more compute: on for real models and "
        "long answers (TRL's trainers: prepare's SFT, train_rm, dpo, rest and rloo; ppo's own loop keeps them)",
    )
    logits_mb: int = d(
        128,
        "memory, in MB, that vocabulary-wide temporaries may take at once: every KL, log-probability and NLL "
        "computes the LM head only at the positions it uses, a chunk of tokens at a time sized to fit, and TRL's "
        "trainers tile their fused LM head to fit (docs/scaling.md); larger is faster on a GPU",
        ge=16,
    )
    report_to: Literal["none", "tensorboard", "wandb", "trackio", "mlflow"] = d(
        "none",
        "where every trainer logs its training curves, one run per round and step (`r01-train_rm`), TensorBoard "
        "under logs/ (offline; `pip install tensorboard`); wandb, trackio and mlflow take their own settings; "
        "changing it re-runs no stage",
    )

    @field_validator("accelerate_config")
    @classmethod
    def _config_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_file():
            raise ValueError(f"no such file: {v}")
        return v


# What a training stage's outputs depend on in `runtime`: not report_to, since where the curves go changes no
# weight, so turning TensorBoard on re-runs no stage.
TRAINING_RUNTIME = tuple(
    f"runtime.{k}"
    for k in ("seed", "threads", "device", "num_processes", "accelerate_config", "activation_checkpointing")
)


class TinyModel(Section):
    """The locally built base LM of the offline default (a Llama of a few million parameters)."""

    hidden_size: int = d(256, "hidden width", gt=0)
    layers: int = d(4, "transformer layers", gt=0)
    heads: int = d(4, "attention heads", gt=0)
    intermediate_size: int = d(512, "MLP width", gt=0)
    pretrain_epochs: float = d(1.0, "epochs of pre-training on prepare.pretrain before SFT (0: none)", ge=0)
    learning_rate: float = d(1e-3, "pre-training learning rate", gt=0)


class Prepare(Section):
    """Round 0: the SFT policy every round starts from, built here or taken from a model folder or hub id."""

    policy: str = d("tiny", "tiny: make it here by SFT (of base); else a local path or hub id of an SFT policy")
    base: str | None = d(
        None,
        "the base LM SFT fine-tunes (a local path or hub id); null: build and pre-train the tiny Llama",
    )
    chat_template: str | None = d(
        None, "a chat template (Jinja) for a base whose tokenizer has none; conversational SFT rows need one"
    )
    tiny: TinyModel = d(TinyModel(), "the tiny model's shape and pre-training")
    pretrain: str = d("data/pretrain.txt", "plain text the tiny base LM is pre-trained on, one line each")
    sft: str = d(
        "data/sft.jsonl",
        "prompt/completion rows SFT trains on, strings or TRL's conversational messages (and ReST's keep_sft)",
    )
    sft_epochs: float = d(2.0, "SFT epochs (completion-only loss)", ge=0)
    learning_rate: float = d(1e-3, "SFT learning rate", gt=0)
    batch_size: int = d(32, "pre-training and SFT batch size", gt=0)
    max_length: int = d(96, "longest pre-training or SFT sequence, in tokens", gt=0)

    @field_validator("policy", "base")
    @classmethod
    def _local_path_exists(cls, v: str | None) -> str | None:
        if v not in ("tiny", None) and missing_local_dir(v):
            raise ValueError(f"no such model directory: {v}")
        return v

    @model_validator(mode="after")
    def _base_for_sft(self) -> Prepare:
        if self.base and self.policy != "tiny":
            raise ValueError("[base] a base to fine-tune, but prepare.policy takes an SFT policy as it is: set one")
        return self


class PromptSet(Section):
    """One prompt set: a JSONL file of rows with an `id` and a `prompt` (a string, or a list of messages as in
    TRL's conversational format), an s3:// JSONL object, a local dataset (parquet, JSON, CSV, arrow, a
    `save_to_disk` folder) or a Hub dataset id, loaded with `datasets`. A bare string is its `path`."""

    path: str = d(..., "the file, folder, s3:// object or Hub dataset id")
    split: str = d("train", "the dataset split (a JSONL file or s3:// object has one)")
    column: str = d(
        "prompt",
        "the column holding the prompt: a string or messages; a conversation ending in an answer "
        "(a preference set's `chosen`) is cut before the answer",
    )
    id_column: str | None = d(None, "the column of unique ids; null: `id` where present, else a hash of the prompt")
    sample: int | None = d(None, "take this many rows at random (seeded); null: all", gt=0)
    seed: int = d(0, "the seed of that sample")
    revision: str | None = d(None, "a Hub dataset's revision (branch, tag or commit), recorded with the round")

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, v):
        return {"path": v} if isinstance(v, str) else v

    def files(self) -> list[str]:
        """What DVC can hash of it: the local file or folder, or the s3:// object; nothing for a Hub id."""
        local = self.path.startswith(("s3://", ".", "/", "~")) or Path(self.path).expanduser().exists()
        return [self.path] if local else []


class Prompts(Section):
    """The three disjoint prompt sets, and how long a prompt may be. Each set is a path or a section of
    `path`, `split`, `column`, ... (prompts.label.path and below)."""

    label: PromptSet = d(
        PromptSet(path="data/prompts/label.jsonl"), "sampled and judged each round: the reward model's training data"
    )
    policy: PromptSet = d(
        PromptSet(path="data/prompts/policy.jsonl"), "sampled and scored by the proxy RM in the policy update"
    )
    eval: PromptSet = d(PromptSet(path="data/prompts/eval.jsonl"), "held out: evaluation only")
    max_prompt_length: int = d(
        1024,
        "longest prompt, in the policy's tokens; a longer one is dropped or cut "
        "(too_long) before any generation, so no input can exhaust memory",
        ge=8,
    )
    too_long: Literal["drop", "truncate"] = d(
        "drop",
        "a prompt over max_prompt_length: left out (counted in the "
        "step's summary and the round's metrics), or cut to its last "
        "max_prompt_length tokens",
    )


class Sampling(Section):
    """How generate samples the label prompts (and, unless update_policy.rollouts says otherwise, the policy
    update's own prompts, update_policy.k each)."""

    k: int = d(8, "samples per label prompt; pairs need two", ge=2)
    temperature: float = d(1.0, "sampling temperature", gt=0)
    top_k: int = d(0, "sample among the k likeliest tokens; 0: off", ge=0)
    top_p: float = d(1.0, "nucleus sampling mass; 1: off", gt=0, le=1)
    max_new_tokens: int = d(48, "longest response, in tokens", gt=0)
    batch_size: int = d(64, "sequences generated at once", gt=0)
    backend: Literal["transformers", "vllm"] = d(
        "transformers",
        "the engine of every sampling of a round (generate, the methods' rollouts, evaluate): vllm runs on a GPU "
        "or a CPU, in its own environment (generate.vllm_python; docs/scaling.md)",
    )
    vllm_memory: float = d(
        0.5,
        "backend vllm: the share of the device's memory its engine takes, model and KV cache (a GPU's; on a CPU, "
        "of the machine's memory); the rest is for training and judges",
        gt=0,
        lt=1,
    )
    vllm_python: str = d(
        ".venv-vllm/bin/python",
        "backend vllm: the Python of the environment vLLM is installed in (`make install-vllm` makes .venv-vllm); "
        "a path (a relative one from the project, else from the folder holding the running environment), or a "
        "command on PATH",
    )


# generate's keys that decide what a sampling draws, the params of the stages that sample (dvc.yaml): not where
# vLLM is installed or how much memory its engine takes, so moving the environment reruns nothing.
SAMPLING_PARAMS = tuple(f"generate.{k}" for k in Sampling.model_fields if k not in ("vllm_python", "vllm_memory"))


class Judge(Section):
    """The gold judge (rlhf/judges/). `rubric`: a built-in programmatic rubric (`name: pink_elephant`);
    `python`: any callable `module:function` scoring (prompts, responses); `hf`: a sequence-classification
    reward model, `name` a local path or hub id; `ultrarm`: UltraRM's LlamaModel + regression_head."""

    type: Literal["rubric", "python", "hf", "ultrarm"] = d("rubric", "which kind of judge (docs/judges.md)")
    name: str = d(
        "pink_elephant", "rubric: its name; python: module:function; hf/ultrarm: a reward model's local path or hub id"
    )
    input: Literal["template", "chat", "pair"] = d(
        "template",
        "hf/ultrarm: how a prompt and response become the "
        "model's input (a template, the chat template, or a "
        "(question, answer) pair)",
    )
    template: str = d(
        "Human: {prompt}\nAssistant: {response}", "input: template: the text scored, with {prompt} and {response}"
    )
    trust_remote_code: bool = d(False, "let a judge run its own modelling code (off: it is refused)")
    allow_pickle: bool = d(False, "load .bin/.pt weights when a model has no safetensors (they can run code)")
    batch_size: int = d(16, "responses scored at once", gt=0)
    max_length: int = d(1024, "longest judge input, in tokens (longer ones are truncated)", gt=0)
    best: float | None = d(None, "the most the judge can give, if known (the rubric's is 1.0)")

    @model_validator(mode="after")
    def _consistent(self) -> Judge:
        if self.type == "rubric" and self.name != "pink_elephant":
            raise ValueError(f"[name] the built-in rubric is pink_elephant (got {self.name!r})")
        if self.type == "python" and not re.fullmatch(r"[\w.]+:\w+", self.name):
            raise ValueError(f"[name] a python judge is module:function (got {self.name!r})")
        if self.type in ("hf", "ultrarm") and missing_local_dir(self.name):
            raise ValueError(f"[name] no such model directory: {self.name}")
        if self.input == "template" and not {"{prompt}", "{response}"} <= set(re.findall(r"{\w+}", self.template)):
            raise ValueError("[template] needs both {prompt} and {response}")
        return self


class Label(Section):
    """How the gold judge's scores become preference pairs."""

    judge: Judge = d(Judge(), "the gold judge")
    world: str = d("data/world.json", "the rubric's world: topics, forbidden words, sentence shapes")
    pairs: Literal["best_worst", "all_pairs"] = d(
        "best_worst", "one pair per prompt (best vs worst sample), or every pair of its samples"
    )
    ties: Literal["skip", "keep"] = d("skip", "a pair of equal scores: skipped, or kept")
    unfinished: Literal["drop", "keep"] = d(
        "drop",
        "a response cut at generate.max_new_tokens: left out of the pairs (still scored), or paired like the "
        "rest (TRL's RewardTrainer then appends an EOS to it)",
    )
    noise: float = d(0.0, "probability of flipping a pair (AlpacaFarm; Coste et al. use 0.25)", ge=0, le=0.5)
    workers: int = d(1, "processes scoring shards of the samples at once (on GPUs: worker i on cuda:i)", gt=0)


class TrainRM(Section):
    """The proxy reward model trained each round (TRL's RewardTrainer)."""

    init: Literal["sft", "base", "last"] = d(
        "sft",
        "what the RM starts from: the SFT policy, the base LM, or the previous round's RM (round 1: the SFT policy)",
    )
    objective: Literal["bt", "bt_margin", "absolute", "combined"] = d(
        "bt", "Bradley-Terry, BT with the gold margin, regression on gold scores, or a BT and a regression head"
    )
    weight: float = d(0.5, "combined: reward = w sigmoid(r_pref) + (1 - w) sigmoid(r_abs)", ge=0, le=1)
    data: Literal["last", "concat", "sample"] = d(
        "last", "which rounds' pairs: this one's, all so far, or an equal share of each round's"
    )
    sample_size: int = d(400, "sample: pairs in all, an equal share from each round so far", gt=0)
    unique_prompts: bool = d(False, "sample: each prompt at most once")
    epochs: float = d(2.0, "training epochs", gt=0)
    batch_size: int = d(16, "pairs per batch (global)", gt=0)
    learning_rate: float = d(1e-4, "learning rate", gt=0)
    max_length: int = d(128, "longest prompt + response, in tokens (TRL drops longer pairs)", gt=0)


class Lora(Section):
    """PEFT LoRA for the policy update; rank 0 trains every weight instead."""

    rank: int = d(0, "0: train every weight; > 0: a LoRA adapter per round over the SFT policy", ge=0)
    alpha: float = d(16.0, "LoRA alpha (the update is scaled by alpha / rank)", gt=0)
    dropout: float = d(0.0, "LoRA dropout", ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = d(
        "all-linear", "the modules adapted: all-linear, or a list of names"
    )


class CoTrain(Section):
    """An auxiliary prompt/completion set mixed into the policy update to keep the model's priors."""

    data: str = d("data/cotrain.jsonl", "prompt/completion rows")
    ratio: int = d(0, "update batches per auxiliary batch (e.g. 4); 0: no co-training", ge=0)
    coef: float = d(1.0, "weight of the auxiliary NLL term (dpo, ppo, rloo; rest mixes the rows into its data)", gt=0)


class DPO(Section):
    """DPO on the proxy's best-vs-worst pairs of the policy's own samples (TRL's DPOTrainer)."""

    beta: float = d(0.1, "DPO's beta (strength of the implicit KL term)", gt=0)
    epochs: float = d(2.0, "epochs over the pairs", gt=0)
    # 5e-5: at 1e-4 one round's KL to SFT could more than double and gold fall 6 SE (2 of 4 seeds, docs/results.md)
    learning_rate: float = d(5e-5, "learning rate", gt=0)


class PPO(Section):
    """The project's own PPO: GAE, clipped policy and value losses, a per-token KL penalty."""

    kl_coef: float = d(0.05, "beta of the per-token KL penalty (the start value if target_kl is set)", ge=0)
    target_kl: float | None = d(None, "per-sequence KL an adaptive controller steers toward; null: fixed kl_coef", gt=0)
    horizon: int = d(10_000, "the adaptive controller's horizon (Ziegler et al.)", gt=0)
    gamma: float = d(1.0, "discount", ge=0, le=1)
    lam: float = d(0.95, "GAE lambda", ge=0, le=1)
    clip: float = d(0.2, "policy ratio clip", gt=0)
    dual_clip: float | None = d(
        3.0, "bound a negative advantage's loss at this many times |A| (dual clip, Ye et al. 2020); null: off", gt=1
    )
    stop_kl: float | None = d(
        0.05,
        "end an iteration's minibatch passes at the first minibatch whose approximate per-token KL to the rollout "
        "policy exceeds this (Stable-Baselines3's target_kl); null: every pass runs",
        gt=0,
    )
    value_clip: float = d(0.2, "value clip", gt=0)
    value_coef: float = d(0.1, "weight of the value loss", ge=0)
    whiten: bool = d(True, "whiten advantages per rollout batch")
    rollout_prompts: int = d(64, "prompts per rollout batch (each sampled update_policy.k times)", gt=0)
    ppo_epochs: int = d(4, "passes over each rollout batch", gt=0)
    epochs: float = d(1.0, "passes over the policy prompts", gt=0)
    # 5e-5 and stop_kl 0.05: no rollout KL jumped 4x on the seeds bench/seeds.py ran; 1e-4 and 0.1 jumped on 2 of 8
    learning_rate: float = d(5e-5, "policy learning rate", gt=0)
    value_learning_rate: float = d(1e-4, "value head learning rate", gt=0)


class ReST(Section):
    """ReST: grow (sample) once, then improve steps on the samples above rising reward quantiles (SFT)."""

    thresholds: list[float] = d([0.5, 0.7, 0.9], "one improve step each, on the reward's quantile in [0, 1)")
    keep_sft: bool = d(False, "mix the SFT set (prepare.sft) into each improve step, one SFT row per sample")
    epochs: float = d(1.0, "epochs per improve step", gt=0)
    learning_rate: float = d(1e-4, "learning rate", gt=0)

    @field_validator("thresholds")
    @classmethod
    def _rising(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 <= t < 1 for t in v) or v != sorted(v):
            raise ValueError(f"must be a non-empty rising list of quantiles in [0, 1) (got {v})")
        return v


class RLOO(Section):
    """RLOO (TRL's RLOOTrainer) with the proxy reward: k samples per prompt, a leave-one-out baseline."""

    # 0.2 and 5e-5: at 0.05 and 1e-4 the policy found what the proxy overrated (empty or 3x longer answers) and lost
    # a round on 3 of 8 seeds, once down to gold 0.11 (docs/policy-updates.md)
    beta: float = d(0.2, "weight of a sample's KL to the reference (summed over its tokens) taken off its reward", ge=0)
    epochs: float = d(1.0, "epochs over the policy prompts", gt=0)
    learning_rate: float = d(5e-5, "learning rate", gt=0)


class Rollouts(Section):
    """How the policy update samples its own prompts; each key left null takes generate's value."""

    temperature: float | None = d(
        None, "sampling temperature; ppo and rloo compute log-probabilities and the KL at this temperature", gt=0
    )
    top_k: int | None = d(None, "sample among the k likeliest tokens; 0: off (ppo and rloo need it off)", ge=0)
    top_p: float | None = d(None, "nucleus sampling mass; 1: off (ppo and rloo need it off)", gt=0, le=1)
    max_new_tokens: int | None = d(None, "longest rollout response, in tokens", gt=0)

    def of(self, generate: Sampling, k: int) -> Sampling:
        """The rollouts' sampling: generate's, with this section's keys that are set, and k samples per prompt."""
        given = {key: v for key, v in self.model_dump().items() if v is not None}
        return generate.model_copy(update={**given, "k": k})


class UpdatePolicy(Section):
    """The policy update: its method, the reward it optimises, where it starts and what it is kept close to."""

    method: Literal["dpo", "ppo", "rest", "rloo"] = d("dpo", "the update method (docs/policy-updates.md)")
    reward: Literal["last", "ensemble_mean", "ensemble_min", "ensemble_uwo", "weight_average"] = d(
        "last",
        "the reward optimised: the round's RM, an ensemble of every round's RM so far (mean, min, or mean - "
        "uwo_lambda * std), or one RM whose weights are the average of theirs",
    )
    uwo_lambda: float = d(1.0, "ensemble_uwo: mean - uwo_lambda * std", ge=0)
    init: Literal["sft", "last", "liti"] = d(
        "last", "where each round's policy starts: the SFT policy, the previous round's, or liti's interpolation"
    )
    eta: float = d(0.5, "liti: init_k = (1 - eta) init_(k-1) + eta policy_(k-1)", ge=0, le=1)
    ref: Literal["sft", "init"] = d("sft", "the KL reference: the SFT policy or the round's initial policy")
    k: int = d(4, "samples per policy prompt: dpo pairs best vs worst, rest and rloo groups, ppo rollouts", ge=1)
    batch_size: int = d(16, "examples per batch (global)", gt=0)
    max_length: int = d(128, "longest prompt + response, in tokens", gt=0)
    rollouts: Rollouts = d(Rollouts(), "the sampling of the update's own prompts (default: generate's)")
    unfinished: Literal["penalty", "drop", "keep"] = d(
        "penalty",
        "a rollout cut at max_new_tokens: scored as is less missing_eos_penalty (TRL's convention), left out "
        "(of dpo's pairs, of ppo's and rloo's loss, of rest's ranking), or kept as it is; rest trains on finished "
        "samples only",
    )
    missing_eos_penalty: float = d(1.0, "unfinished: penalty: subtracted from an unfinished rollout's reward", ge=0)
    lora: Lora = d(Lora(), "LoRA adapters instead of full weights")
    cotrain: CoTrain = d(CoTrain(), "co-training with an auxiliary set")
    dpo: DPO = d(DPO(), "method: dpo")
    ppo: PPO = d(PPO(), "method: ppo")
    rest: ReST = d(ReST(), "method: rest")
    rloo: RLOO = d(RLOO(), "method: rloo")

    @model_validator(mode="after")
    def _runnable(self) -> UpdatePolicy:
        if self.method in ("dpo", "rloo") and self.k < 2:
            raise ValueError(f"[k] {self.method} needs at least 2 samples per prompt (got {self.k})")
        if self.method == "rloo" and self.batch_size % self.k:
            raise ValueError(f"[batch_size] rloo needs a multiple of k={self.k} (got {self.batch_size})")
        if self.init == "liti" and self.lora.rank:
            raise ValueError(
                "[init] liti interpolates full weights; with lora.rank > 0 a round keeps only an "
                "adapter: use sft or last, or set lora.rank: 0"
            )
        return self


class Landscape(Section):
    """A grid of prompts from two axes (after QDAIF), answered by each round's policy and scored by gold and
    proxy; `axes: {}` turns it off. The template names both axes, e.g. "... {opener} the {topic} ..."."""

    template: str = d("{a} {b}", "the prompt of a cell, naming both axes")
    axes: dict[str, list[str]] = d({}, "exactly two axes, each a list of distinct values; {}: off")
    samples: int = d(2, "samples per cell", gt=0)

    @model_validator(mode="after")
    def _two_axes(self) -> Landscape:
        if not self.axes:
            return self
        if len(self.axes) != 2 or any(not v or len(set(v)) != len(v) for v in self.axes.values()):
            raise ValueError("[axes] needs exactly two axes, each a non-empty list of distinct values")
        if set(re.findall(r"{(\w+)}", self.template)) != set(self.axes):
            raise ValueError(
                f"[template] must name exactly the axes {{{'}, {'.join(self.axes)}}} (got {self.template!r})"
            )
        return self


class Evaluate(Section):
    """Evaluation on the held-out prompts, sampled from the policy itself (temperature 1, no top-k/top-p)."""

    samples_per_prompt: int = d(4, "samples per held-out prompt", gt=0)
    best_of_n: list[Annotated[int, Field(gt=0)]] = d(
        [], "e.g. [1, 2, 4, 8]: gold and proxy of the proxy's best of n samples, at the KL bound log n - (n-1)/n"
    )
    landscape: Landscape = d(Landscape(), "the reward landscape grid")
    checkpoints: int = d(
        0,
        "N > 0: the policy update saves N evenly spaced intermediate policies (scratch, under the round's "
        "checkpoints/) and evaluate scores each as the final one, writing metrics.json's `curve` and `fits` "
        "(gold and proxy against d = sqrt(KL)); 0: off",
        ge=0,
    )
    max_new_tokens: int = d(48, "longest response, in tokens", gt=0)
    batch_size: int = d(64, "sequences generated at once", gt=0)
    heldout: str | None = d(
        "data/heldout.jsonl",
        "general text no step trains on (JSONL rows: a `text`, every token scored, or a `prompt` and "
        "`completion`, the completion and eos scored; an optional `source` is reported apart): the round's "
        "and the SFT policy's mean token NLL and perplexity on it, metrics.json's `forgetting`; null: off",
    )
    conversation_checks: str | None = d(
        "data/conversation_checks.jsonl",
        "prompts outside the RLHF task (a prompt set: `id` and `prompt` rows, or a dataset as prompts.* take), "
        "answered samples_per_prompt times, scored by the `conversational` rubric (the answer ends, is not "
        "empty, is no degenerate repetition) and the gold judge: metrics.json's `conversation`; null: off",
    )
    lm_eval: list[str] = d(
        [],
        "lm-evaluation-harness tasks run on the round's policy, each a task name or a task YAML file of your "
        "own (`pip install 'iterated-rlhf[lm-eval]'`), their metrics in metrics.json's `lm_eval`; []: off",
    )
    lm_eval_limit: int | None = d(None, "examples per lm_eval task; null: all", gt=0)


class Storage(Section):
    """The DVC remote every round goes to (set it up with `rlhf remote s3://bucket/prefix`)."""

    push: bool = d(
        False, "`dvc push` each round's outputs as soon as the round completes (an unreachable remote fails the run)"
    )
    remote: str | None = d(None, "a DVC remote's name; null: the project's default remote")
    timeout: float = d(
        30.0, "seconds a remote that does not answer may hold up a push before the run fails, naming it", gt=0
    )
    pull: bool = d(
        False,
        "restore a stage from the default remote's run-cache when any run, on any machine, already computed it "
        "(`dvc repro --pull`), rather than compute it again; a study on a work pool sets it with push",
    )


class Config(Section):
    """params.yaml: every key optional except `rounds`."""

    runtime: Runtime = d(Runtime(), "how every stage runs")
    rounds: dict[str, str] = Field(
        description="one entry per round, each naming the round it starts from "
        "(r01: r00, r02: r01, ...); `rlhf run --more N` adds entries"
    )
    prepare: Prepare = d(Prepare(), "round 0: the SFT policy")
    prompts: Prompts = d(Prompts(), "the prompt sets")
    generate: Sampling = d(Sampling(), "sampling the label prompts")
    label: Label = d(Label(), "the gold judge and preference pairs")
    train_rm: TrainRM = d(TrainRM(), "the proxy reward model")
    update_policy: UpdatePolicy = d(UpdatePolicy(), "the policy update")
    evaluate: Evaluate = d(Evaluate(), "evaluation on held-out prompts")
    storage: Storage = d(Storage(), "the DVC remote")

    @field_validator("rounds")
    @classmethod
    def _rounds_chain(cls, rounds: dict[str, str]) -> dict[str, str]:
        if not rounds:
            raise ValueError("needs at least one round (r01: r00)")
        for i, (name, prev) in enumerate(rounds.items(), 1):
            if name != round_name(i) or prev != round_name(i - 1):
                raise ValueError(f"entry {i} must be '{round_name(i)}: {round_name(i - 1)}' (got '{name}: {prev}')")
        return rounds

    def rollouts(self) -> Sampling:
        """How the policy update samples: update_policy.rollouts over generate, update_policy.k per prompt."""
        return self.update_policy.rollouts.of(self.generate, self.update_policy.k)

    @model_validator(mode="after")
    def _lengths_fit(self) -> Config:
        up, rollouts = self.update_policy, self.rollouts()
        if max(self.generate.max_new_tokens, rollouts.max_new_tokens) >= up.max_length:
            raise ValueError(
                "[update_policy.max_length] must exceed generate.max_new_tokens and update_policy.rollouts."
                "max_new_tokens (prompt + response)"
            )
        if up.method in ("ppo", "rloo") and (rollouts.top_k or rollouts.top_p < 1):
            key = "top_k" if rollouts.top_k else "top_p"
            raise ValueError(
                f"[update_policy.rollouts.{key}] {up.method} scores its samples' log-probabilities under the "
                f"tempered distribution, which top-k/top-p sampling is not: set update_policy.rollouts.{key} "
                f"to {0 if key == 'top_k' else 1} (generate's {key} may stay for labelling)"
            )
        n = self.runtime.num_processes
        if n > 1 and self.update_policy.method == "ppo":
            raise ValueError(
                "[runtime.num_processes] ppo (the project's own loop) runs in one process; use dpo, "
                "rest or rloo to train on several, or num_processes: 1"
            )
        self._shards_as_asked()
        for key, size in (
            ("prepare", self.prepare.batch_size),
            ("train_rm", self.train_rm.batch_size),
            ("update_policy", self.update_policy.batch_size),
        ):
            if size % n:
                raise ValueError(
                    f"[{key}.batch_size] the global batch is split over runtime.num_processes={n}: "
                    f"needs a multiple of {n} (got {size})"
                )
        return self

    def _shards_as_asked(self) -> None:
        """What an accelerate config cannot do: shard ppo's own loop (it does not run under accelerate), or under
        FSDP train one model with a second trainer (it cannot shard what the first one sharded; prepare's tiny
        pre-training then SFT is refused in that step, tasks/prepare.py)."""
        kind = sharding(self.runtime.accelerate_config)
        if kind and self.update_policy.method == "ppo":
            raise ValueError(
                "[runtime.accelerate_config] ppo (the project's own loop) does not run under accelerate, so "
                f"{'DeepSpeed' if kind == 'DEEPSPEED' else kind} would not shard it; use dpo, rest or rloo, or no "
                "accelerate_config"
            )
        if kind and self.generate.backend == "vllm":
            raise ValueError(
                "[generate.backend] vllm is served the policy's whole weights after each update, which "
                f"{'DeepSpeed' if kind == 'DEEPSPEED' else kind} (runtime.accelerate_config) keeps in shards over "
                "the ranks; train without it (DDP, an engine per rank), or use generate.backend: transformers"
            )
        if kind == "FSDP" and self.update_policy.method == "rest" and len(self.update_policy.rest.thresholds) > 1:
            raise ValueError(
                "[update_policy.rest.thresholds] under FSDP (runtime.accelerate_config) an improve step cannot "
                "shard again the model the previous one sharded: give one threshold, or use DeepSpeed"
            )


def sharding(accelerate_config: str | None) -> str | None:
    """FSDP or DEEPSPEED where an accelerate config file asks for it (its distributed_type), else None."""
    try:
        kind = yaml.safe_load(Path(accelerate_config).expanduser().read_text())["distributed_type"]
    except (TypeError, OSError, yaml.YAMLError, KeyError):  # no file, or not one accelerate reads: launch says
        return None
    return kind if kind in ("FSDP", "DEEPSPEED") else None


# The params keys that name a data file a step reads (a study copies them into each run's workspace).
INPUT_FILES = (
    "label.world",
    "prepare.pretrain",
    "prepare.sft",
    "prompts.eval",
    "prompts.label",
    "prompts.policy",
    "update_policy.cotrain.data",
    "evaluate.heldout",
    "evaluate.conversation_checks",
)


def missing_local_dir(path: str) -> bool:
    """True for a local-looking path that is not a folder. A hub id ("org/name") is not checked offline."""
    p = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or Path(p.parts[0]).exists()
    return looks_local and not p.is_dir()


def round_name(i: int) -> str:
    return f"r{i:02d}"


def round_index(name: str) -> int:
    if not re.fullmatch(r"r\d{2,}", name):
        raise UserError(f"not a round name: {name!r} (expected r00, r01, ...)")
    return int(name[1:])


def load_config(path: str | Path = "params.yaml") -> Config:
    return parse_config(read_yaml(path), path)


def read_yaml(path: str | Path) -> dict:
    """A YAML file holding a mapping; a missing file or bad YAML is one line naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections")
    return raw


def parse_config(raw: dict, where: str | Path, model: type[BaseModel] = Config):
    """`raw` validated as `model`; the first mistake is a UserError `<where>: <key>: <problem>`."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{where}: {_describe(e.errors()[0], model)}") from None


def _describe(err: dict, model: type[BaseModel] = Config) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        near = difflib.get_close_matches(str(err["loc"][-1]), _keys_beside(err["loc"], model), n=1, cutoff=0.6)
        return f"{key}: unknown key" + (
            f" (did you mean {'.'.join(map(str, err['loc'][:-1] + (near[0],)))}?)" if near else ""
        )
    if kind == "missing":
        return f"{key}: required key is missing{_about(err['loc'], model)}"
    msg = msg.removeprefix("Value error, ")
    loc = err["loc"]
    if sub := re.match(r"\[([\w.]+)\] ", msg):  # a validator's message that names the key it is about
        key, msg, kind = f"{key}.{sub[1]}" if key != "(top level)" else sub[1], msg[sub.end() :], "value_error"
        loc = (*loc, *sub[1].split("."))
    got = f" (got {err['input']!r})" if kind != "value_error" and not isinstance(err.get("input"), dict) else ""
    return f"{key}: {msg[0].lower()}{msg[1:]}{got}{_about(loc, model)}"


def _about(loc: tuple, model: type[BaseModel]) -> str:
    """— what the key at `loc` is for and the values it takes, from the schema ('' for no such key)."""
    field = _field(loc, model)
    return f" — {field.description} ({allowed(field)})" if field and field.description and not is_section(field) else ""


def _field(loc: tuple, model: type[BaseModel]):
    """The schema's field at `loc` (e.g. ("train_rm", "data")), or None where no such key is."""
    field = None
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            return None
        model = field.annotation if is_section(field) else None
    return field


def is_section(field) -> bool:
    """Whether a schema field holds a section of keys rather than one value."""
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def allowed(field) -> str:
    """The values a key takes, in words: `last | concat | sample`, `integer >= 1`, `text or null`."""
    bounds = [
        f"{sign} {getattr(m, attr)}"
        for m in field.metadata
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if getattr(m, attr, None) is not None
    ]
    return _type(field.annotation) + (" " + ", ".join(bounds) if bounds else "")


def _type(annotation) -> str:
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type(a) for a in args)
    if origin is list:
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type(args[0])} to {_type(args[1])}" if args else "mapping"
    if origin is typing.Annotated:
        return _type(args[0])
    return {int: "integer", float: "number", str: "text", bool: "true | false"}.get(annotation, str(annotation))


def _keys_beside(loc: tuple, model: type[BaseModel] = Config) -> list[str]:
    """The valid keys of the section that holds `loc` (for a did-you-mean hint)."""
    holder = _field(loc[:-1], model) if len(loc) > 1 else None
    if len(loc) > 1 and not (holder and is_section(holder)):
        return []
    return list((holder.annotation if holder else model).model_fields)
