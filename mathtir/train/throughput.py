"""Model FLOPs per trained token and the device peak they are measured against (MFU)."""

from __future__ import annotations

import torch

# Peak dense bf16 TFLOP/s per device for the MFU estimate (None: unknown, MFU not reported).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def train_flops_per_token(spec, seq_length: int) -> float:
    """Model FLOPs per trained token, forward + backward: 6 x (matmul parameters) + attention scores.

    Matmul parameters: attention projections (q, o: h x q_dim each; k, v: h x kv_dim each), SwiGLU (3 x h x ffn) per
    layer, and the output layer (h x vocab). Attention: 12 x layers x h x s (QK^T and AV, fwd + bwd, full s x s
    as computed with a mask).
    """
    h, layers, ffn = spec.hidden_size, spec.num_layers, spec.ffn_hidden_size
    q_dim, kv_dim = spec.head_dim * spec.num_attention_heads, spec.head_dim * spec.num_kv_heads
    per_layer = 2 * h * q_dim + 2 * h * kv_dim + 3 * h * ffn
    return 6.0 * (layers * per_layer + h * spec.vocab_size) + 12.0 * layers * h * seq_length


def peak_tflops(configured: float | None, on_gpu: bool) -> float | None:
    """`logging.peak_tflops_per_device` when set, else the device's table entry; None on CPUs (no table value)."""
    if configured:
        return float(configured)
    if not on_gpu:
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
