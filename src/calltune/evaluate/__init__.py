"""Evaluation stage: extract calls from model outputs (via the prompt format), then score them.

`metrics` holds the metric definitions (with their sources); `runner` generates and writes
predictions, metrics and plots.
"""
