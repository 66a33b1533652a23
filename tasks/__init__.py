"""The round steps: one module per step, each a pure function of (config, round) returning a summary."""
