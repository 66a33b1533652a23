"""A gold judge that is any Python function: `label.judge.type: python`, `name: module:function`."""

from __future__ import annotations

import numpy as np

from rlhf.core.errors import UserError


class CallableJudge:
    """Any Python function `module:function(prompts, responses) -> one score per response`. As TRL's reward
    functions, it gets each prompt as text when it is a single user turn, else as its list of messages."""

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

    def score(self, prompts: list, responses: list[str]) -> np.ndarray:
        prompts = [_as_given(p) for p in prompts]
        scores = np.asarray(self.fn(prompts, list(responses)), dtype=np.float64)
        if scores.shape != (len(responses),):
            raise UserError(
                f"label.judge.name: {self.name} returned {scores.shape[0] if scores.ndim else 'a scalar'} "
                f"scores for {len(responses)} responses"
            )
        return scores


def _as_given(prompt):
    one_question = not isinstance(prompt, str) and len(prompt) == 1 and prompt[0]["role"] == "user"
    return prompt[0]["content"] if one_question else prompt
