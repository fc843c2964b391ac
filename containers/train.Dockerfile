# Training image: NVIDIA's PyTorch container already carries CUDA, NCCL, Transformer Engine and Apex, so
# megatron-core picks its TE layer spec and fused kernels. Only mathtir and megatron-core are added.
# Build:  docker build -f containers/train.Dockerfile -t mathtir-train .
ARG BASE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE}
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/mathtir
COPY pyproject.toml README.md ./
COPY mathtir ./mathtir
# The container's torch must stay: install the extras without letting pip touch torch.
RUN pip install --no-deps -e . \
 && pip install "megatron-core>=0.16.1" "transformers>=4.51" safetensors omegaconf psutil gguf accelerate \
        pyarrow tensorboard "math-verify==0.9.0" pyseccomp
COPY convert ./convert
COPY nemo_configs ./nemo_configs
COPY slurm ./slurm
