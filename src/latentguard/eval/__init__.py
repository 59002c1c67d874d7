"""Evaluation: datasets, generation, judges, metrics, runner and HTML reports."""
