"""A gold judge that is any Python function: `label.judge.type: python`, `name: module:function`."""

from __future__ import annotations

from numbers import Number

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
        """One number per response; whatever else the function does (raises, returns strings, too few or
        non-finite scores) is one line naming it."""
        prompts = [_as_given(p) for p in prompts]
        try:
            out = self.fn(prompts, list(responses))
        except Exception as e:  # the user's code: its failure is theirs to read in one line, not ours to trace
            raise UserError(f"label.judge.name: {self.name} raised {type(e).__name__}: {e}") from None
        scores = _numbers(out, self.name)
        if scores.shape != (len(responses),):
            raise UserError(
                f"label.judge.name: {self.name} returned {scores.shape[0] if scores.ndim else 'a scalar'} "
                f"scores for {len(responses)} responses"
            )
        if (bad := np.flatnonzero(~np.isfinite(scores))).size:
            raise UserError(f"label.judge.name: {self.name} returned {scores[bad[0]]} for response {bad[0] + 1}")
        return scores


def _as_given(prompt):
    one_question = not isinstance(prompt, str) and len(prompt) == 1 and prompt[0]["role"] == "user"
    return prompt[0]["content"] if one_question else prompt


def _numbers(out, name: str) -> np.ndarray:
    """A judge's return as float64: numbers (a list, an array, a tensor), never strings, even numeric ones."""
    if hasattr(out, "detach"):  # a torch tensor
        out = out.detach().cpu().numpy()
    try:
        arr = np.asarray(out)
    except ValueError:  # ragged
        arr = np.asarray(out, dtype=object)
    if arr.dtype.kind in "iuf":
        return arr.astype(np.float64)
    flat = list(np.asarray(out, dtype=object).ravel()) if not isinstance(out, np.ndarray) else list(arr.ravel())
    flat = [x.item() if isinstance(x, np.generic) else x for x in flat]  # name Python types in the message
    i, x = next(
        ((i, x) for i, x in enumerate(flat) if isinstance(x, bool | np.bool_ | str) or not isinstance(x, Number)),
        (0, flat[0] if flat else out),
    )
    raise UserError(
        f"label.judge.name: {name} returned {type(x).__name__} {x!r} for response {i + 1}; a judge returns "
        "one number per response"
    )
