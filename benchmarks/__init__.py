"""Benchmarks of `cpt` against PEFT's CPT: one script per question (see each module's docstring).

Run from the repository root, e.g. ``python -m benchmarks.speed --help``.
"""
