"""Benchmark scripts: side by side, in one process, as ratios."""
