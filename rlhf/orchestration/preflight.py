"""Preflight: what can fail in a second rather than after an hour of rounds, checked before the first step.

The config schema (rlhf/core/config.py) checks each value on its own; the checks here need the
implementations: the files params name are read, a local model folder is inspected (remote code, pickle
weights, architecture, pad token), the judge is built or imported, the remote is looked up.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.core.config import Config
from rlhf.core.errors import UserError
from rlhf.core.io import read_jsonl
from rlhf.core.paths import CACHE_LINKS
from rlhf.core.prompts import messages_of, read_prompts
from rlhf.judges import CallableJudge, PinkElephantJudge
from rlhf.judges.reward_models import check_judge
from rlhf.ml.chat import saved_generation_config, stop_ids
from rlhf.ml.models import check_local_model, load_tokenizer
from rlhf.ml.sampler import require_vllm
from rlhf.orchestration.storage import remote_for_push
from rlhf.studies.grid import Study


def check_inputs(cfg: Config) -> None:
    """What can fail in a second rather than after an hour of rounds: the project and the files params name."""
    for path in ("dvc.yaml", ".dvc"):
        if not Path(path).exists():
            raise UserError(f"{path}: not found; run from the project root (a DVC repository)")
    if cfg.runtime.device == "cuda":  # as the stages ask for it
        from rlhf.ml.models import device

        device(cfg)
    warn_if_copying()
    if cfg.prepare.base:
        read_jsonl(cfg.prepare.sft, required=("prompt", "completion"), what="prepare.sft")
        check_policy(cfg.prepare.base, "prepare.base")
    elif cfg.prepare.policy == "tiny":
        if not Path(cfg.prepare.pretrain).is_file():
            raise UserError(f"{cfg.prepare.pretrain}: no such file (prepare.pretrain)")
        read_jsonl(cfg.prepare.sft, required=("prompt", "completion"), what="prepare.sft")
    else:
        check_policy(cfg.prepare.policy, "prepare.policy")
    sets = check_prompt_sets(cfg)  # after the policy's checks: its template renders them
    if cfg.generate.backend == "vllm":
        require_vllm(cfg)
    judge = cfg.label.judge
    if judge.type == "rubric":
        PinkElephantJudge(cfg.label.world)  # reads and checks the world file (label.world)
    elif judge.type == "python":  # imported and called as the steps will: a typo or a bad return fails now
        exercise_judge(CallableJudge(judge.name), sets["label"])
    else:
        check_judge(judge)
    u = cfg.update_policy
    if u.cotrain.ratio:
        read_jsonl(u.cotrain.data, required=("prompt", "completion"), what="update_policy.cotrain.data")
    if u.method == "rest" and u.rest.keep_sft and cfg.prepare.policy != "tiny":
        read_jsonl(cfg.prepare.sft, required=("prompt", "completion"), what="prepare.sft")
    if cfg.storage.push:
        remote_for_push(cfg.storage.remote)  # a run that would push to no remote stops before it starts
    if cfg.storage.pull:
        remote_for_push(None, "storage.pull")  # `dvc repro --pull` reads the default remote
    check_forgetting(cfg)


def cache_types() -> list[str]:
    """The project's DVC cache.type, in order (DVC's default where it sets none)."""
    import configparser

    dvc = configparser.ConfigParser()
    dvc.read([".dvc/config", ".dvc/config.local"])
    return dvc.get("cache", "type", fallback="reflink,copy").strip("'\" ").split(",")


def links_outputs() -> bool:
    return bool({"hardlink", "symlink"} & set(cache_types()))


def warn_if_copying() -> None:
    """A project that lets DVC copy its outputs into the cache (its default where the file system has no reflinks,
    as a project made before CACHE_LINKS has) stores every model twice: say how to store it once."""
    import logging

    if not links_outputs():
        logging.getLogger("rlhf").warning(
            ".dvc/config: cache.type %s copies every output into .dvc/cache where the file system has no reflinks "
            "(each model on disk twice); `dvc config cache.type %s` and `dvc checkout --relink` store them once",
            ",".join(cache_types()),
            CACHE_LINKS,
        )


def check_forgetting(cfg: Config) -> None:
    """evaluate's held-out text and conversation checks load; lm_eval is installed and its task files exist."""
    from rlhf.core.config import PromptSet
    from rlhf.evaluation import harness
    from rlhf.ml.nll import read_heldout

    e = cfg.evaluate
    if e.heldout:
        read_heldout(e.heldout)
    if e.conversation_checks:
        read_prompts(PromptSet(path=e.conversation_checks), "evaluate.conversation_checks")
    for task in e.lm_eval:  # a missing file first: installing lm_eval would not mend it
        if task.endswith((".yaml", ".yml")) and not harness.is_file(task):
            raise UserError(f"evaluate.lm_eval: {task}: no such task file")
    if e.lm_eval:
        harness.require()


def check_policy(path: str, key: str) -> None:
    """A local policy folder (`key` names it) loads without running code, has something to pad with, and
    names an eos or end-of-turn token, so that its responses can end. A hub id is checked as it loads."""
    if not Path(path).expanduser().is_dir():
        return
    check_local_model(path, key)
    try:
        tok = load_tokenizer(path)
        stop_ids(tok, saved_generation_config(path))
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def check_prompt_sets(cfg: Config) -> dict[str, list[dict]]:
    """Each prompt set loads (file, split, column) and holds enough prompts for what the params ask; none
    shares a prompt with the held-out eval set; each renders through a local policy's chat template
    (conversations need one). Returns the sets."""
    import logging

    from rlhf.ml.chat import render

    sets = {key: read_prompts(getattr(cfg.prompts, key), f"prompts.{key}") for key in ("label", "policy", "eval")}
    seen = {key: {json.dumps(r["prompt"], sort_keys=True) for r in rows} for key, rows in sets.items()}
    for key in ("label", "policy"):
        if shared := len(seen[key] & seen["eval"]):
            raise UserError(f"prompts.{key}: {shared} of its prompts are also in prompts.eval, which must be held out")
    if shared := len(seen["label"] & seen["policy"]):
        logging.getLogger("rlhf").warning("prompts.label and prompts.policy share %d prompts", shared)
    policy = Path(cfg.prepare.base or cfg.prepare.policy).expanduser()
    if policy.is_dir():  # every prompt renders: a template may refuse a system turn, none takes conversations
        tok = load_tokenizer(policy)
        tok.chat_template = cfg.prepare.chat_template or tok.chat_template
        for key, rows in sets.items():
            render(tok, [r["prompt"] for r in rows], f"prompts.{key}")
    for key, (need, why) in needed(cfg).items():
        if len(sets[key]) < need:
            raise UserError(
                f"prompts.{key}: {getattr(cfg.prompts, key).path} has {len(sets[key])} prompts; {why} needs {need}"
            )
    return sets


def needed(cfg: Config) -> dict[str, tuple[int, str]]:
    """The fewest prompts each set can have, and what needs them: one batch of pairs for the reward model,
    one batch for the policy update, two held-out prompts for a mean and its error."""
    import math

    up, k = cfg.update_policy, cfg.update_policy.k
    per_prompt = 1 if cfg.label.pairs == "best_worst" else cfg.generate.k * (cfg.generate.k - 1) // 2
    policy = {"dpo": up.batch_size, "rloo": up.batch_size // k}.get(up.method, math.ceil(up.batch_size / k))
    return {
        "label": (
            math.ceil(cfg.train_rm.batch_size / per_prompt),
            f"a train_rm batch of {cfg.train_rm.batch_size} pairs (label.pairs: {cfg.label.pairs})",
        ),
        "policy": (policy, f"an update_policy batch ({up.method}, batch_size {up.batch_size}, k {k})"),
        "eval": (2, "evaluate's statistics"),
    }


def exercise_judge(judge, label_prompts: list[dict]) -> None:
    """A few responses to the first label prompts scored as the steps will score them, so that a judge that
    raises, or returns strings, too few or non-finite scores, fails now in one line, not after prepare."""
    examples = ("I am not sure .", "here is a short answer .")
    conversations = [messages_of(r["prompt"]) for r in label_prompts[:3] for _ in examples]
    judge.score(conversations, [e for _ in label_prompts[:3] for e in examples])


def check_study(study: Study) -> None:
    """What `rlhf check` checks, for each configuration: files its params name, model folders, judges."""
    for config, runs in study.configs.items():
        try:
            check_inputs(Config.model_validate(runs[0].params))
        except UserError as e:
            raise UserError(f"{study.path}: {config}: {e}") from None
