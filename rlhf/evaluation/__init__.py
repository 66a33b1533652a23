"""Evaluation: the statistics evaluate writes, the reward landscape, the per-round table, report and plots."""
