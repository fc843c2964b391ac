# Evaluation image: vLLM (GPU sampling) + Ray, plus bubblewrap for the code sandbox on CPU nodes.
# Build:  docker build -f containers/eval.Dockerfile -t mathtir-eval .
ARG BASE=vllm/vllm-openai:v0.11.0
FROM ${BASE}
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# bubblewrap isolates model-written code; libseccomp backs the per-snippet syscall filter.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap libseccomp2 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/mathtir
COPY pyproject.toml README.md ./
COPY mathtir ./mathtir
RUN pip install --no-deps -e . \
 && pip install "ray[default]>=2.40" pyarrow matplotlib "math-verify==0.9.0" sympy numpy mpmath pyseccomp
COPY ray_eval ./ray_eval
COPY slurm ./slurm
ENTRYPOINT []
