"""Helpers of eval/bench_train.py (the GPU training/sampling/loader benchmark, issue 9)."""
