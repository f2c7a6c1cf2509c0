"""Grouped matrix multiply of the experts: rows grouped by expert times that expert's weight.

    grouped_mm(x [R, i], w [E, i, o], counts) -> [R, o]   rows counts[0] of expert 0, then expert 1, ...

Three loop-free paths, picked per call:
- equal counts (expert choice, DiffMoE training: every expert takes exactly k tokens): one `bmm`
  on views, no copies;
- unequal counts: `torch._grouped_mm` (CPU fp32/bf16, CUDA bf16 on recent GPUs; widths whose rows
  are multiples of 16 bytes), through an autograd function of our own (its built-in backward
  rejects broadcast gradients);
- otherwise (float64, GPUs without grouped GEMM): rows scattered into a zero-padded
  [E, max_count, i] buffer and one `bmm`. The padding is bounded by the largest group, which the
  capacity limit bounds for token choice with drop.
"""
from __future__ import annotations

import torch

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Probe torch._grouped_mm once per (device type, dtype) on a tiny input."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                a = torch.ones(16, 16, device=device, dtype=dtype)
                b = torch.ones(2, 16, 16, device=device, dtype=dtype)
                offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
                ok = bool(torch._grouped_mm(a, b, offs=offs).eq(16).all())
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, w.transpose(1, 2), offs=offs) if ctx.needs_input_grad[0] else None
        # 2D x 2D with offsets along the shared row dimension gives one [i, o] block per expert.
        grad_w = torch._grouped_mm(x.t(), grad, offs=offs) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def _padded_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    num, width = len(counts), max(counts)
    counts_t = torch.tensor(counts, device=x.device)
    starts = torch.cumsum(counts_t, 0) - counts_t
    expert_of_row = torch.repeat_interleave(torch.arange(num, device=x.device), counts_t)
    slot = expert_of_row * width + torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]
    padded = x.new_zeros(num * width, x.shape[1]).index_copy(0, slot, x)
    return torch.bmm(padded.view(num, width, -1), w).view(num * width, -1)[slot]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[R, i] rows grouped by expert (`counts[e]` rows each) times w [E, i, o] -> [R, o]."""
    num = w.shape[0]
    if len(counts) != num or sum(counts) != x.shape[0]:
        raise ValueError(f"grouped_mm: counts {counts} do not split {x.shape[0]} rows over {num} experts")
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[2]) + 0 * w.sum()  # keeps w in the graph (zero gradient)
    if min(counts) == max(counts):
        return torch.bmm(x.reshape(num, counts[0], -1), w).view(x.shape[0], -1)
    if torch.is_autocast_enabled(x.device.type):  # a custom function is not autocast by itself
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    aligned = all(n * x.element_size() % 16 == 0 for n in w.shape[1:])  # the kernel's stride rule
    if aligned and x.dtype == w.dtype and _grouped_mm_supported(x.device, x.dtype):
        offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x.device)
        return _GroupedMM.apply(x.contiguous(), w, offs)
    return _padded_mm(x, w, counts)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, counts: list[int]) -> torch.Tensor:
    """grouped_mm plus a per-expert bias [E, o] (fused into one baddbmm when counts are equal)."""
    if bias is None:
        return grouped_mm(x, w, counts)
    if x.shape[0] and len(counts) == w.shape[0] and min(counts) == max(counts) and sum(counts) == x.shape[0]:
        return torch.baddbmm(bias.unsqueeze(1), x.reshape(len(counts), counts[0], -1), w).view(x.shape[0], -1)
    rows = torch.repeat_interleave(bias, torch.tensor(counts, device=bias.device), dim=0, output_size=x.shape[0])
    return grouped_mm(x, w, counts) + rows
