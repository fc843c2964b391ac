# Training image: NVIDIA's PyTorch container already carries CUDA, NCCL, Transformer Engine and Apex, so
# megatron-core picks its TE layer spec and fused kernels. Only mathtir and megatron-core are added.
# Build:  docker build -f containers/train.Dockerfile -t mathtir-train .
ARG BASE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE}
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/mathtir
COPY pyproject.toml README.md ./
COPY containers/constraints.txt ./containers/constraints.txt
COPY mathtir ./mathtir
# The container's torch must stay: install the train extra's packages without letting pip touch torch, at
# the versions CI tests (constraints.txt; transformers and datasets are this image's own pins).
RUN pip install --no-deps -e . \
 && pip install -c containers/constraints.txt "megatron-core==0.16.1" "transformers==5.24.0" "datasets==5.2.0" \
        omegaconf psutil pyarrow tensorboard tqdm "math-verify==0.9.0" sympy mpmath pyseccomp
COPY convert ./convert
COPY nemo_configs ./nemo_configs
COPY slurm ./slurm
