"""lm-evaluation-harness tasks on the round's policy (`evaluate.lm_eval`), an optional extra:
`pip install 'iterated-rlhf[lm-eval]'`.

The policy already in memory is handed to lm_eval's HF model (no second load); each entry of
evaluate.lm_eval is a registered task name (its dataset comes from the Hub, as lm_eval fetches it) or a
task YAML file of your own, e.g. one reading a local JSONL file, which runs offline. The result per task
is {metric: value} with lm_eval's filter suffix dropped (`acc,none` -> `acc`, `acc_stderr,none` ->
`acc_stderr`), and `sample_len`, the examples scored.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from rlhf.core.errors import UserError

KEY = "evaluate.lm_eval"


def require() -> None:
    """One line naming the key when lm_eval is not installed."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(
            f"{KEY}: needs the lm-evaluation-harness, which is not installed: pip install 'iterated-rlhf[lm-eval]' "
            "(or pip install lm_eval), or set evaluate.lm_eval: []"
        )


def is_file(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) and Path(task).expanduser().is_file()


def files(tasks: list[str]) -> list[str]:
    """The task YAML files among the entries (what evaluate reads, for its DVC deps)."""
    return [t for t in tasks if is_file(t)]


def run(tasks: list[str], policy, tok, limit: int | None, seed: int, batch_size: int = 8) -> dict:
    """{task: {metric: value}} of every task (a group's subtasks each), lm_eval's seeds set to the stage's."""
    require()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # lm_eval logs every request at INFO; a round's log needs its warnings only
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    named = [t for t in tasks if not is_file(t)]
    manager = TaskManager(include_defaults=bool(named))  # indexing lm_eval's own tasks takes seconds: only if named
    specs = [str(Path(t).expanduser()) if is_file(t) else t for t in tasks]
    model = HFLM(pretrained=policy, tokenizer=tok, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(
            model=model,
            tasks=specs,
            task_manager=manager,
            limit=limit,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except KeyError as e:  # lm_eval: "Spec 'x' is not a registered task/group/tag name or valid YAML path"
        raise UserError(f"{KEY}: {e.args[0] if e.args else e}") from None
    return {task: _numbers(result) for task, result in out["results"].items()}


def scores(result: dict) -> dict[str, float]:
    """A task's scores alone, for tables: not their standard errors nor lm_eval's count of examples."""
    return {k: v for k, v in result.items() if not k.endswith("_stderr") and k != "sample_len"}


def _numbers(result: dict) -> dict[str, float]:
    out = {}
    for name, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name.split(",")[0]] = float(value)  # NaN (a stderr lm_eval could not compute) is no JSON
    return out
