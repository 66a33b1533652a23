"""The policy-update methods (`update_policy.method`): each module's `update(u)` trains `u.policy` in place
against the proxy reward and returns a small summary. `u` is tasks.update_policy.Update."""
