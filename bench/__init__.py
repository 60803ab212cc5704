"""Benchmarks: each runs its baseline side by side in one process and reports ratios."""
