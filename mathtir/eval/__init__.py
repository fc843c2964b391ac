"""Evaluation: sampler backends (samplers), Ray actors (actors), the TIR loop (tir), code execution (execution),
problems, per-sample records with resume (records), metrics, report, comparison of runs (compare), and the job
(job). `mathtir eval` (cli) and ray_eval/run.py are the entry points."""
