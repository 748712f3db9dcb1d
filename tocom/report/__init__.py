"""Presentation and evidence: tables, plots, merge pictures, throughput benchmarks, per-image prediction
records with their provenance, and paired statistics (bootstrap CIs, McNemar) for comparing them."""
