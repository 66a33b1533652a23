"""Gold judges: the fixed reward that stands in for human labellers (`label.judge` in params.yaml).

A judge has `score(prompts, responses) -> numpy array` and `best` (the most it can give, or None).
`make_judge` builds the configured one: the programmatic rubric below, any Python callable, or a
reward model (rlhf/reward_judges.py).

The offline default is the *pink-elephant* rubric over the world in data/world.json. A prompt asks
about one topic. An answer is split into sentences at "." and scored in [0, 1]:

    gold = 0.4 * on_topic + 0.2 * fluent + 0.2 * length + 0.2 * clean

- on_topic: share of sentences that are fluent and use a word (noun or adjective) of the asked topic;
- fluent:   share of sentences of 3-10 known words that end with "." and repeat no word twice in a row;
- length:   1 for 2-4 sentences, 0.5 for 1 or 5, else 0;
- clean:    1 if no forbidden word ("elephant", "trunk", ...) appears, else 0.

An empty answer scores 0.

An answer of 2-4 well-formed on-topic sentences without elephants scores the best, 1.0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from rlhf.errors import UserError

log = logging.getLogger("rlhf")


def make_judge(cfg, dev: str | None = None):
    j = cfg.label.judge
    if j.type == "rubric":
        return PinkElephantJudge(cfg.label.world)
    if j.type == "python":
        return CallableJudge(j.name, j.best)
    from rlhf import models
    from rlhf.reward_judges import load_model_judge

    return load_model_judge(j, dev or models.device(cfg))


def score_in_workers(cfg, prompts: list[str], responses: list[str]) -> np.ndarray:
    """Every response's gold score, by `label.workers` processes at once (e.g. a 13B judge on each of several
    GPUs: worker i on cuda:i), each loading the judge once and scoring one shard. The shards are whole
    batches of the one-process order (by length), dealt round-robin, so each batch, its padding and so its
    scores are exactly those of one process."""
    import multiprocessing

    from rlhf.reward_judges import length_order

    n = min(cfg.label.workers, len(prompts))
    if n == 1:
        return make_judge(cfg).score(prompts, responses)
    order, size = length_order(prompts, responses), cfg.label.judge.batch_size
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    shards = [np.concatenate(batches[w::n]) for w in range(n) if batches[w::n]]
    log.info("scoring %d samples in %d worker processes", len(prompts), len(shards))
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch or CUDA state
    workers = []
    for w, idx in enumerate(shards):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(cfg, w, [prompts[i] for i in idx], [responses[i] for i in idx], send),
                           name=f"label-worker-{w}", daemon=True)
        proc.start()
        send.close()
        workers.append((proc, recv, idx))
    scores = np.empty(len(prompts), dtype=np.float64)
    for w, (proc, recv, idx) in enumerate(workers):
        try:
            kind, value = recv.recv()
        except EOFError:
            proc.join()
            raise UserError(f"label.workers: worker {w} died (exit status {proc.exitcode})") from None
        proc.join()
        if kind == "error":
            raise UserError(value)
        scores[idx] = value
    return scores


def _worker(cfg, w: int, prompts: list[str], responses: list[str], conn) -> None:
    from rlhf.lifetime import die_with_parent

    die_with_parent()
    dev = None
    if cfg.label.judge.type in ("hf", "ultrarm"):
        import torch

        from rlhf import models

        dev = models.device(cfg)
        dev = f"cuda:{w % torch.cuda.device_count()}" if dev.startswith("cuda") else dev
    try:
        conn.send(("ok", make_judge(cfg, dev).score(prompts, responses)))
    except UserError as e:
        conn.send(("error", str(e)))


class CallableJudge:
    """Any Python function `module:function(prompts, responses) -> one score per response`."""

    def __init__(self, name: str, best: float | None = None):
        import importlib
        import os
        import sys

        if os.getcwd() not in sys.path:  # a judge module kept in the project, as `python -m rlhf` finds it
            sys.path.insert(0, os.getcwd())
        module, fn = name.split(":")
        try:
            self.fn = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise UserError(f"label.judge.name: cannot import {name} ({e})") from None
        self.name, self.best = name, best

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        scores = np.asarray(self.fn(list(prompts), list(responses)), dtype=np.float64)
        if scores.shape != (len(responses),):
            raise UserError(f"label.judge.name: {self.name} returned {scores.shape[0] if scores.ndim else 'a scalar'} "
                            f"scores for {len(responses)} responses")
        return scores


WEIGHTS = {"on_topic": 0.4, "fluent": 0.2, "length": 0.2, "clean": 0.2}


class PinkElephantJudge:
    best = 1.0

    def __init__(self, world_path: str | Path):
        path = Path(world_path)
        if not path.is_file():
            raise UserError(f"{path}: no such file (label.world)")
        try:
            world = json.loads(path.read_text(encoding="utf-8"))
            self._read(world)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a valid world file ({type(e).__name__}: {e})") from None

    def _read(self, world: dict) -> None:
        self.topics = {t: set(v["nouns"]) | set(v["adjectives"]) for t, v in world["topics"].items()}
        self.forbidden = set(world["forbidden"])
        self.min_sent, self.max_sent = world["sentences_per_answer"]
        self.min_words, self.max_words = world["words_per_sentence"]
        # Every word the world's sentences can use; the fluency check calls anything else gibberish.
        templates = " ".join(world["sentence_templates"] + world["forbidden_sentences"] + world["big"])
        self.known = {w for w in templates.split() if "{" not in w} | set().union(*self.topics.values())

    def topic_of(self, prompt: str) -> str | None:
        words = prompt.split()
        return next((t for t in self.topics if t in words), None)

    def components(self, prompt: str, response: str) -> dict[str, float]:
        text = response.strip()
        sentences = [s.split() for s in text.split(".")]
        ends_open = bool(sentences) and bool(sentences[-1])  # text after the last "."
        sentences = [s for s in sentences if s]
        n = len(sentences)
        if n == 0:
            return dict.fromkeys(WEIGHTS, 0.0)
        fluent = [self._fluent(s) for s in sentences]
        fluent[-1] = fluent[-1] and not ends_open  # a sentence must end with "."
        # Only well-formed sentences count as on topic, so a string of topic words earns nothing.
        topic_words = self.topics.get(self.topic_of(prompt), set())
        on_topic = sum(f and bool(topic_words.intersection(s)) for f, s in zip(fluent, sentences)) / n
        length = 1.0 if self.min_sent <= n <= self.max_sent else 0.5 if n in (self.min_sent - 1, self.max_sent + 1) else 0.0
        clean = 0.0 if self.forbidden.intersection(text.split()) else 1.0
        return {"on_topic": on_topic, "fluent": sum(fluent) / n, "length": length, "clean": clean}

    def _fluent(self, words: list[str]) -> bool:
        return (
            self.min_words <= len(words) <= self.max_words
            and all(a != b for a, b in zip(words, words[1:]))
            and all(w in self.known for w in words)
        )

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        parts = [self.components(p, r) for p, r in zip(prompts, responses, strict=True)]
        return np.array([sum(WEIGHTS[k] * c[k] for k in WEIGHTS) for c in parts], dtype=np.float64)
