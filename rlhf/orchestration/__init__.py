"""Orchestration: what runs the steps rather than what they compute: preflight checks, the generated DVC
stages, the preload process that steps fork from, the Prefect server, several-process launches and storage."""
