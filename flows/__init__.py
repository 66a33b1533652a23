"""Prefect flows that run the rounds."""
