"""Presentation: tables, plots, merge pictures and throughput benchmarks of compressed models."""
