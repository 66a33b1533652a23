"""Studies: grids of configurations x seeds (grid.py), each run in its own DVC workspace, and their report."""
