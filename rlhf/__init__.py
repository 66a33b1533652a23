"""Iterated RLHF: a policy and a proxy reward model co-evolve against a fixed gold judge, round after round.

The library's layers, each importing only those below it (tests/test_layers.py checks it): cli, then
flows/ (Prefect), orchestration, tasks/ (one module per step), studies, evaluation, judges, ml, core.
"""
