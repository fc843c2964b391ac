"""Process groups + megatron model-parallel state + RNG, shared by the converters and the trainer.

Launchers: torchrun (locally, and under Slurm one srun task per node running torchrun — slurm/common.sh),
or a plain `python` (a world of one).
"""

from __future__ import annotations

import os
import random
import socket
import sys
from datetime import timedelta

import torch

from mathtir.megatron import compat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_env_from_launcher() -> None:
    """torchrun sets the torch.distributed env vars itself; without it this process is a world of one."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def initialize(tp: int, pp: int, *, seed: int, vp: int | None = None, timeout_minutes: int = 30) -> None:
    """Init torch.distributed (nccl on GPU, gloo on CPU), megatron's TP/PP/DP groups and the RNG streams.

    Idempotent for the same sizes; the world size must be a multiple of tp*pp (the rest is data parallel).
    """
    from megatron.core import parallel_state, tensor_parallel

    compat.activate()  # the one place the CPU layer is applied (a no-op with a GPU)
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


def relaunch_under_torchrun(nproc: int) -> None:
    """Re-execute this script under `torchrun --standalone` with `nproc` ranks when it was started as a
    plain process, so a CLI with --tp 2 works as typed. Returns only when no relaunch is needed."""
    if nproc <= 1 or "RANK" in os.environ:
        return
    # `python -m mathtir` leaves mathtir/__main__.py in argv[0]; run again as a script, its directory would
    # come first on sys.path and `import megatron` would find mathtir/megatron: relaunch it as a module.
    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["-m", main_spec.name.removesuffix(".__main__")] if main_spec else [sys.argv[0]]
    os.execv(
        sys.executable,
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *program,
         *sys.argv[1:]],
    )


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
