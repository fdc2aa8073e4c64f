"""Stages (teacher, rebalance, soft labels, distill, virtual examples, evaluate) and the pipeline."""
