"""Core: the config schema, round paths and step names, atomic io, seeds, ranks, S3 reads, child processes and
errors. Imports nothing else of the project."""
