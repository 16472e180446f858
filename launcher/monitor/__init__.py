"""Monitoring: metrics.jsonl and wandb (metrics.py), FLOPs and MFU (flops.py), plots (plot.py),
BLEU/chrF of generations (scores.py)."""
