"""Iterated RLHF: a policy and a proxy reward model co-evolve against a fixed gold judge, round after round."""

__version__ = "0.1.0"

# One name per step everywhere: tasks/<step>.py, the DVC stage <step>@<round>, the Prefect task
# <round>-<step>, and the round's output folder or file.
ROUND_STEPS = ("generate", "label", "train_rm", "update_policy", "evaluate")
STEPS = ("prepare", *ROUND_STEPS)
