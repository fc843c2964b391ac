#!/usr/bin/env bash
# Checks that need a GPU, run by hand on a GPU machine from the repository root: prints the figures.
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}

# HF backend (continuous batching) on the GPU with SmolLM2-135M-Instruct: 32 problems x 15 samples -> samples/s
"$PYTHON" bench/hf_sampler.py --device cuda --problems 32 --samples 15 --max-tokens 512 --no-baseline
