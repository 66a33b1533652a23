"""Seeds: each stage's own, derived from runtime.seed, so a rerun of any stage draws exactly as before."""

from __future__ import annotations

import zlib

from rlhf.core.config import Config


def stage_seed(cfg: Config, step: str, rnd: str) -> int:
    """Each stage's own seed, from runtime.seed: the same every run, different for every stage."""
    return (cfg.runtime.seed * 1_000_003 + zlib.crc32(f"{step}@{rnd}".encode())) % 2**31
