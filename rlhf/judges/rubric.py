"""The offline default gold judge: the *pink-elephant* rubric over the world in data/world.json. A prompt asks
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
from pathlib import Path

import numpy as np

from rlhf.core.errors import UserError
from rlhf.core.prompts import last_user_turn

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
        length = (
            1.0 if self.min_sent <= n <= self.max_sent else 0.5 if n in (self.min_sent - 1, self.max_sent + 1) else 0.0
        )
        clean = 0.0 if self.forbidden.intersection(text.split()) else 1.0
        return {"on_topic": on_topic, "fluent": sum(fluent) / n, "length": length, "clean": clean}

    def _fluent(self, words: list[str]) -> bool:
        return (
            self.min_words <= len(words) <= self.max_words
            and all(a != b for a, b in zip(words, words[1:]))
            and all(w in self.known for w in words)
        )

    def score(self, prompts: list, responses: list[str]) -> np.ndarray:
        """Scores of (prompt, response) pairs; a prompt is a string or a conversation, whose last user turn
        asks the question."""
        parts = [self.components(last_user_turn(p), r) for p, r in zip(prompts, responses, strict=True)]
        return np.array([sum(WEIGHTS[k] * c[k] for k in WEIGHTS) for c in parts], dtype=np.float64)
