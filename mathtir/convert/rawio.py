"""Bytes of a file read straight into a tensor's memory: no intermediate buffer, no second copy."""

from __future__ import annotations

import os

import torch


def pread_into(fd: int, offset: int, out: torch.Tensor, what: str) -> None:
    """Fill contiguous `out` with the file's bytes from `offset` on; `what` names the data in errors."""
    if not out.is_contiguous():
        raise ValueError(f"{what}: destination is not contiguous")
    view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    while view.nbytes:
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise ValueError(f"{what}: file truncated")
        view, offset = view[got:], offset + got
