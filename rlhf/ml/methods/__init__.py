"""The policy-update methods (`update_policy.method`): each module's `update(u)` trains `u.policy` in place
against the proxy reward and returns a small summary. `u` is tasks.update_policy.Update.

A new method is a module here with an `update(u)`, its name in METHODS and in the `method` choices of
UpdatePolicy (rlhf/core/config.py); docs/extending.md walks through it.
"""

from rlhf.ml.methods import dpo, ppo, rest, rloo

METHODS = {"dpo": dpo.update, "ppo": ppo.update, "rest": rest.update, "rloo": rloo.update}
