"""Evaluation: data, prompts and metrics for measuring what pruning costs in quality."""
