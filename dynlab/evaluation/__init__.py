"""Evaluating finetuned models: generation, repetition statistics and pairwise judging."""
