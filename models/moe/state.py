"""Routing state that must stay fp32 when the model is cast (DeepSpeed bf16 casts modules and buffers).

The sigmoid_bias router's balancing bias moves by ~1e-3 per step, the predictor thresholds by
(1 - 0.95) x a difference, and load counts reach thousands: bf16's 8-bit mantissa would lose them.
"""
from __future__ import annotations

import torch
from torch import nn


class Fp32Buffers(nn.Module):
    """An nn.Module whose buffers named in `fp32_buffers` stay float32 through .to / .half / .bfloat16."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        super()._apply(fn, recurse)
        for name in self.fp32_buffers:
            buf = getattr(self, name, None)
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self
