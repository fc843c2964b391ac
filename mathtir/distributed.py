"""Process group + megatron model-parallel state + RNG, shared by the converters and the trainer.

Launchers: torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set), srun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID;
the sbatch script exports MASTER_ADDR/MASTER_PORT), or a plain `python` (a world of one).
"""

from __future__ import annotations

import os
import random
import socket
from datetime import timedelta

import torch

from mathtir import cpu_compat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_env_from_launcher() -> None:
    """torchrun sets the torch.distributed env vars itself; translate srun's, or default to one process."""
    if "RANK" in os.environ:
        return
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError("under srun, MASTER_ADDR and MASTER_PORT must be exported by the batch script")
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def initialize(tp: int, pp: int, *, seed: int, vp: int | None = None, timeout_minutes: int = 30) -> None:
    """Init torch.distributed (nccl on GPU, gloo on CPU), megatron's TP/PP/DP groups and the RNG streams.

    Idempotent for the same sizes; the world size must be a multiple of tp*pp (the rest is data parallel).
    """
    from megatron.core import parallel_state, tensor_parallel

    cpu_compat.activate()
    if not torch.distributed.is_initialized():
        _fill_env_from_launcher()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
        )
    world = torch.distributed.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not a multiple of tp*pp = {tp}*{pp}")

    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
            and parallel_state.get_virtual_pipeline_model_parallel_world_size() == vp
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vp,
        )

    random.seed(seed)
    torch.manual_seed(seed)
    # Per-TP-rank streams for init/dropout inside TP regions; the default stream is shared across TP.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
