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

Positive = Field(gt=0)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Runtime(Section):
    seed: int = 0
    threads: int = Field(2, ge=1)  # fixed, because 1 and 2 threads give different weights
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # > 1: the training steps (prepare, train_rm, update_policy) run as that many ranks under `accelerate
    # launch`, batch sizes staying global (README: Scaling out); several nodes count every node's processes
    num_processes: int = Field(1, ge=1)
    accelerate_config: str | None = None  # an `accelerate config` or DeepSpeed/FSDP config file for the launch

    @field_validator("accelerate_config")
    @classmethod
    def _config_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_file():
            raise ValueError(f"no such file: {v}")
        return v


class TinyModel(Section):
    """The locally built base LM of the offline default (a Llama of a few million parameters)."""

    hidden_size: int = Field(256, gt=0)
    layers: int = Field(4, gt=0)
    heads: int = Field(4, gt=0)
    intermediate_size: int = Field(512, gt=0)
    pretrain_epochs: float = Field(1.0, ge=0)
    learning_rate: float = Field(1e-3, gt=0)


class Prepare(Section):
    policy: str = "tiny"  # "tiny" builds the offline default; else a local path or hub id of an SFT policy
    tiny: TinyModel = TinyModel()
    pretrain: str = "data/pretrain.txt"
    sft: str = "data/sft.jsonl"
    sft_epochs: float = Field(2.0, ge=0)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, gt=0)
    max_length: int = Field(96, gt=0)

    @field_validator("policy")
    @classmethod
    def _local_path_exists(cls, v: str) -> str:
        if v != "tiny" and missing_local_dir(v):
            raise ValueError(f"no such model directory: {v}")
        return v


class Prompts(Section):
    label: str = "data/prompts/label.jsonl"
    policy: str = "data/prompts/policy.jsonl"
    eval: str = "data/prompts/eval.jsonl"


class Sampling(Section):
    k: int = Field(8, ge=2)  # samples per prompt; pairs need two
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(64, gt=0)
    # the generate step's engine: vllm (a GPU and `pip install vllm`) for real runs, else transformers
    backend: Literal["transformers", "vllm"] = "transformers"


class Judge(Section):
    """The gold judge (rlhf/judges/). `rubric`: a built-in programmatic rubric (`name: pink_elephant`);
    `python`: any callable `module:function` scoring (prompts, responses); `hf`: a sequence-classification
    reward model, `name` a local path or hub id; `ultrarm`: UltraRM's LlamaModel + regression_head."""

    type: Literal["rubric", "python", "hf", "ultrarm"] = "rubric"
    name: str = "pink_elephant"
    input: Literal["template", "chat", "pair"] = "template"  # hf: how a prompt and response become input
    template: str = "Human: {prompt}\nAssistant: {response}"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load .bin/.pt weights when a model has no safetensors
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(1024, gt=0)
    best: float | None = None  # the most the judge can give, if known (the rubric's is 1.0)

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
    judge: Judge = Judge()
    world: str = "data/world.json"
    pairs: Literal["best_worst", "all_pairs"] = "best_worst"
    ties: Literal["skip", "keep"] = "skip"  # a pair of equal scores
    noise: float = Field(0.0, ge=0, le=0.5)  # probability of flipping a pair (AlpacaFarm; Coste et al. use 0.25)
    workers: int = Field(1, gt=0)  # processes scoring shards of the samples at once (on GPUs: worker i on cuda:i)


class TrainRM(Section):
    init: Literal["sft", "base", "last"] = "sft"  # last: the previous round's RM (round 1: the SFT policy)
    objective: Literal["bt", "bt_margin", "absolute", "combined"] = "bt"
    weight: float = Field(0.5, ge=0, le=1)  # combined: reward = w sigmoid(r_pref) + (1 - w) sigmoid(r_abs)
    data: Literal["last", "concat", "sample"] = "last"  # which rounds' pairs: this one, all so far, or a sample
    sample_size: int = Field(400, gt=0)  # sample: pairs in all, an equal share from each round so far
    unique_prompts: bool = False  # sample: each prompt at most once
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(16, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    max_length: int = Field(128, gt=0)


class Lora(Section):
    """PEFT LoRA for the policy update; rank 0 trains every weight instead."""

    rank: int = Field(0, ge=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class CoTrain(Section):
    """An auxiliary prompt/completion set mixed into the policy update to keep the model's priors."""

    data: str = "data/cotrain.jsonl"  # prompt/completion rows
    ratio: int = Field(0, ge=0)  # update batches per auxiliary batch; 0 = no co-training
    coef: float = Field(1.0, gt=0)  # weight of the auxiliary NLL term (dpo, ppo, rloo)


class DPO(Section):
    beta: float = Field(0.1, gt=0)
    epochs: float = Field(2.0, gt=0)
    learning_rate: float = Field(1e-4, gt=0)


class PPO(Section):
    kl_coef: float = Field(0.05, ge=0)  # beta of the per-token KL penalty (the start value if target_kl is set)
    target_kl: float | None = Field(None, gt=0)  # per-sequence KL an adaptive controller steers toward
    horizon: int = Field(10_000, gt=0)  # the adaptive controller's horizon (Ziegler et al.)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip: float = Field(0.2, gt=0)  # policy ratio clip
    value_clip: float = Field(0.2, gt=0)
    value_coef: float = Field(0.1, ge=0)
    whiten: bool = True  # whiten advantages per rollout batch
    missing_eos_penalty: float | None = Field(None, ge=0)  # subtracted from the score of a response that never ended
    rollout_prompts: int = Field(64, gt=0)  # prompts per rollout batch (each sampled k times)
    ppo_epochs: int = Field(4, gt=0)  # passes over each rollout batch
    epochs: float = Field(1.0, gt=0)  # passes over the policy prompts
    learning_rate: float = Field(1e-4, gt=0)
    value_learning_rate: float = Field(1e-4, gt=0)


class ReST(Section):
    thresholds: list[float] = [0.5, 0.7, 0.9]  # one improve step each, on the reward's quantile in [0, 1)
    keep_sft: bool = False  # mix the SFT set (prepare.sft) into each improve step, one SFT row per sample
    epochs: float = Field(1.0, gt=0)  # per improve step
    learning_rate: float = Field(1e-4, gt=0)

    @field_validator("thresholds")
    @classmethod
    def _rising(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 <= t < 1 for t in v) or v != sorted(v):
            raise ValueError(f"must be a non-empty rising list of quantiles in [0, 1) (got {v})")
        return v


class RLOO(Section):
    beta: float = Field(0.05, ge=0)
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(1e-4, gt=0)


class UpdatePolicy(Section):
    method: Literal["dpo", "ppo", "rest", "rloo"] = "dpo"
    # the reward the policy optimises: the round's RM, an ensemble of every round's RM so far (mean, min, or
    # mean - uwo_lambda * std), or one RM whose weights are the average of theirs
    reward: Literal["last", "ensemble_mean", "ensemble_min", "ensemble_uwo", "weight_average"] = "last"
    uwo_lambda: float = Field(1.0, ge=0)
    init: Literal["sft", "last", "liti"] = "last"  # where each round's policy starts
    eta: float = Field(0.5, ge=0, le=1)  # liti: init_k = (1 - eta) init_(k-1) + eta policy_(k-1)
    ref: Literal["sft", "init"] = "sft"  # the KL reference: the SFT policy or the round's initial policy
    k: int = Field(4, ge=1)  # samples per policy prompt: dpo pairs best vs worst, rest and rloo groups, ppo rollouts
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(128, gt=0)
    lora: Lora = Lora()
    cotrain: CoTrain = CoTrain()
    dpo: DPO = DPO()
    ppo: PPO = PPO()
    rest: ReST = ReST()
    rloo: RLOO = RLOO()

    @model_validator(mode="after")
    def _runnable(self) -> UpdatePolicy:
        if self.method in ("dpo", "rloo") and self.k < 2:
            raise ValueError(f"[k] {self.method} needs at least 2 samples per prompt (got {self.k})")
        if self.method == "rloo" and self.batch_size % self.k:
            raise ValueError(f"[batch_size] rloo needs a multiple of k={self.k} (got {self.batch_size})")
        if self.init == "liti" and self.lora.rank:
            raise ValueError("[init] liti interpolates full weights; with lora.rank > 0 a round keeps only an "
                             "adapter: use sft or last, or set lora.rank: 0")
        return self


class Landscape(Section):
    """A grid of prompts from two axes (after QDAIF), answered by each round's policy and scored by gold and
    proxy; `axes: {}` turns it off. The template names both axes, e.g. "... {opener} the {topic} ..."."""

    template: str = "{a} {b}"
    axes: dict[str, list[str]] = {}
    samples: int = Field(2, gt=0)  # samples per cell

    @model_validator(mode="after")
    def _two_axes(self) -> Landscape:
        if not self.axes:
            return self
        if len(self.axes) != 2 or any(not v or len(set(v)) != len(v) for v in self.axes.values()):
            raise ValueError("[axes] needs exactly two axes, each a non-empty list of distinct values")
        if set(re.findall(r"{(\w+)}", self.template)) != set(self.axes):
            raise ValueError(f"[template] must name exactly the axes {{{'}, {'.join(self.axes)}}} "
                             f"(got {self.template!r})")
        return self


class Evaluate(Section):
    samples_per_prompt: int = Field(4, gt=0)
    best_of_n: list[Annotated[int, Field(gt=0)]] = []  # e.g. [1, 2, 4, 8]: the proxy's best of n, gold and proxy
    landscape: Landscape = Landscape()
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(64, gt=0)


class Storage(Section):
    """The DVC remote every round goes to (set it up with `rlhf remote s3://bucket/prefix`)."""

    push: bool = False  # `dvc push` each round's outputs as soon as the round completes
    remote: str | None = None  # a DVC remote's name; null = the project's default remote


class Config(Section):
    runtime: Runtime = Runtime()
    rounds: dict[str, str]
    prepare: Prepare = Prepare()
    prompts: Prompts = Prompts()
    generate: Sampling = Sampling()
    label: Label = Label()
    train_rm: TrainRM = TrainRM()
    update_policy: UpdatePolicy = UpdatePolicy()
    evaluate: Evaluate = Evaluate()
    storage: Storage = Storage()

    @field_validator("rounds")
    @classmethod
    def _rounds_chain(cls, rounds: dict[str, str]) -> dict[str, str]:
        if not rounds:
            raise ValueError("needs at least one round (r01: r00)")
        for i, (name, prev) in enumerate(rounds.items(), 1):
            if name != round_name(i) or prev != round_name(i - 1):
                raise ValueError(f"entry {i} must be '{round_name(i)}: {round_name(i - 1)}' (got '{name}: {prev}')")
        return rounds

    @model_validator(mode="after")
    def _lengths_fit(self) -> Config:
        if self.generate.max_new_tokens >= self.update_policy.max_length:
            raise ValueError("[update_policy.max_length] must exceed generate.max_new_tokens (prompt + response)")
        n = self.runtime.num_processes
        if n > 1 and self.update_policy.method == "ppo":
            raise ValueError("[runtime.num_processes] ppo (the project's own loop) runs in one process; use dpo, "
                             "rest or rloo to train on several, or num_processes: 1")
        for key, size in (("prepare", self.prepare.batch_size), ("train_rm", self.train_rm.batch_size),
                          ("update_policy", self.update_policy.batch_size)):
            if size % n:
                raise ValueError(f"[{key}.batch_size] the global batch is split over runtime.num_processes={n}: "
                                 f"needs a multiple of {n} (got {size})")
        return self


# The params keys that name a data file a step reads (a study copies them into each run's workspace).
INPUT_FILES = ("label.world", "prepare.pretrain", "prepare.sft", "prompts.eval", "prompts.label", "prompts.policy",
               "update_policy.cotrain.data")


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
        return f"{key}: unknown key" + (f" (did you mean {'.'.join(map(str, err['loc'][:-1] + (near[0],)))}?)" if near else "")
    if kind == "missing":
        return f"{key}: required key is missing"
    msg = msg.removeprefix("Value error, ")
    if sub := re.match(r"\[([\w.]+)\] ", msg):  # a validator's message that names the key it is about
        key, msg, kind = f"{key}.{sub[1]}" if key != "(top level)" else sub[1], msg[sub.end():], "value_error"
    got = f" (got {err['input']!r})" if kind != "value_error" and not isinstance(err.get("input"), dict) else ""
    return f"{key}: {msg[0].lower()}{msg[1:]}{got}"


def _keys_beside(loc: tuple, model: type[BaseModel] = Config) -> list[str]:
    """The valid keys of the section that holds `loc` (for a did-you-mean hint)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)
