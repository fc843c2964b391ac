# Evaluation image: vLLM (GPU sampling) + Ray, plus bubblewrap for the code sandbox on CPU nodes.
# Build:  docker build -f containers/eval.Dockerfile -t mathtir-eval .
ARG BASE=vllm/vllm-openai:v0.11.0
FROM ${BASE}
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# bubblewrap isolates model-written code; libseccomp backs the per-snippet syscall filter; a CJK font lets the
# report's plots label categories by name (中1, 数学I・A) instead of C1, C2, ...
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap libseccomp2 fonts-ipaexfont-gothic \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/mathtir
COPY pyproject.toml README.md ./
COPY containers/constraints.txt ./containers/constraints.txt
COPY mathtir ./mathtir
# vLLM's torch and transformers (the 4.57 line, which reads mathtir exports) stay; datasets at the last line
# that accepts that transformers' huggingface-hub.
RUN pip install --no-deps -e . \
 && pip install -c containers/constraints.txt "ray[default]" "datasets==4.8.5" pyarrow matplotlib tqdm \
        "math-verify==0.9.0" sympy mpmath pyseccomp
COPY ray_eval ./ray_eval
COPY slurm ./slurm
ENTRYPOINT []
