"""Evaluation: sampler backends, the TIR loop, per-sample records with resume, metrics and report."""
