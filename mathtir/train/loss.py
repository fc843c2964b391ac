"""The SFT loss in megatron's per-token form: masked sum and token count per micro-batch, reduced to the exact
per-token mean of the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(sum of trained-token losses, trained-token count, for logging): megatron's per-token loss contract.

    megatron does not ignore any label value (not even -100): the 0/1 mask is what excludes prompt, padding
    and cross-document tokens.
    """
    mask = loss_mask.reshape(-1).float()
    masked_sum = (per_token_loss.reshape(-1).float() * mask).sum()
    count = mask.sum()
    return masked_sum, count.to(torch.int), {"lm loss": torch.stack([masked_sum.detach(), count])}


def global_loss(reduced: list[dict], is_last_stage: bool, dp_group, device) -> tuple[float, int]:
    """The step's per-token mean loss over the whole global batch, known on every rank."""
    from megatron.core import parallel_state as mpu

    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if is_last_stage:
        for item in reduced:
            totals += item["lm loss"].to(torch.float64)
        dist.all_reduce(totals, group=dp_group)
    # Only the last pipeline stage has the loss; the others contribute zeros.
    dist.all_reduce(totals, group=mpu.get_pipeline_model_parallel_group())
    return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item())
