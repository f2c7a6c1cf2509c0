"""Grouped linear of the experts: rows grouped by expert times that expert's weight, plus its bias.

    grouped_linear(x [R, i], w [E, i, o], bias [E, o] | None, sizes) -> [R, o]
    rows sizes[0] of expert 0, then expert 1, ...

`sizes` is a `GroupSizes`: the row total (always known on the host: it is a shape) and the
per-expert counts on the host, on the device, or both. No kernel reads device counts back: the
GPU queue never waits on the host here (expert choice knows its counts on the host; token choice
and the receiving side of the all-to-all have them on the device).

`w` may be a transposed view of an [E, o, i] parameter: the weight gradient is produced directly in
the parameter's own memory layout, so autograd never copies an expert-bank-sized gradient to
match it (36 MiB per weight at DiffMoE-S-E16). Each product runs on one of three loop-free
kernels, picked per call:
- equal host counts (expert choice, DiffMoE training: every expert takes exactly k tokens): one
  `bmm` / `baddbmm` on views, no copies;
- otherwise `torch._grouped_mm` with device offsets (CPU fp32/bf16, CUDA bf16 on recent GPUs;
  widths whose rows are multiples of 16 bytes);
- otherwise (float64, GPUs without grouped GEMM): rows scattered into a zero-padded
  [E, max_count, i] buffer and one `bmm`. The padding is bounded by the largest group, which the
  capacity limit bounds for token choice with drop; this fallback reads device counts back (one
  host sync) when they are not known on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class GroupSizes:
    """How many rows each expert has: `rows` in all, per expert on the host (`host`) and/or on the
    device (`device`, int64 [E])."""

    rows: int
    num: int
    host: tuple[int, ...] | None = None
    device: torch.Tensor | None = None

    @staticmethod
    def of(counts: "list[int] | GroupSizes") -> "GroupSizes":
        if isinstance(counts, GroupSizes):
            return counts
        return GroupSizes(sum(counts), len(counts), host=tuple(counts))

    @staticmethod
    def equal(num: int, per_expert: int) -> "GroupSizes":
        return GroupSizes(num * per_expert, num, host=(per_expert,) * num)

    def host_counts(self) -> tuple[int, ...]:
        """Per-expert counts on the host (a device->host sync when only the device has them)."""
        return self.host if self.host is not None else tuple(self.device.tolist())

    def device_counts(self, device: torch.device) -> torch.Tensor:
        return self.device if self.device is not None else torch.tensor(self.host, device=device)


class _Groups:
    """How R rows split over E experts, and the products of a grouped linear on the best kernel."""

    def __init__(self, sizes: GroupSizes, x: torch.Tensor, w: torch.Tensor):
        self.num, self.rows = sizes.num, sizes.rows
        device = x.device
        if sizes.host is not None and min(sizes.host, default=0) == max(sizes.host, default=0):
            self.kind, self.per_expert_rows = "equal", sizes.host[0] if sizes.host else 0
            return
        counts = sizes.device_counts(device)
        self.expert_of_row = torch.repeat_interleave(torch.arange(self.num, device=device), counts,
                                                     output_size=self.rows)
        aligned = all(n * x.element_size() % 16 == 0 for n in w.shape[1:])  # the kernel's stride rule
        if aligned and _grouped_mm_supported(device, x.dtype):
            self.kind = "grouped"
            self.offs = counts.cumsum(0).to(torch.int32)
        else:
            self.kind = "padded"
            self.width = max(sizes.host_counts())
            starts = torch.cumsum(counts, 0) - counts
            self.slot = (self.expert_of_row * self.width + torch.arange(self.rows, device=device)
                         - starts[self.expert_of_row])

    def _equal(self, a: torch.Tensor) -> torch.Tensor:
        """[R, i] -> [E, R / E, i] (a view when a is contiguous)."""
        return a.reshape(self.num, self.per_expert_rows, a.shape[1])

    def _padded(self, a: torch.Tensor) -> torch.Tensor:
        """[R, i] -> [E, max_count, i], zero rows after each expert's own."""
        return a.new_zeros(self.num * self.width, a.shape[1]).index_copy_(0, self.slot, a).view(self.num, self.width, -1)

    def rows_times(self, a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """a [R, i] grouped by expert, w [E, i, o], bias [E, o] -> [R, o]: a's rows of e times w[e] (+ bias[e])."""
        if self.kind == "equal":
            grouped = self._equal(a)
            out = torch.bmm(grouped, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), grouped, w)
            return out.view(self.rows, w.shape[2])
        if self.kind == "grouped":
            out = torch._grouped_mm(a.contiguous(), w, offs=self.offs)
        else:
            out = torch.bmm(self._padded(a), w).view(self.num * self.width, w.shape[2])[self.slot]
        return out if bias is None else out.add_(bias.index_select(0, self.expert_of_row))

    def per_expert(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a [R, i], b [R, o] grouped by expert -> [E, i, o]: sum over each expert's rows of a^T b."""
        if self.kind == "equal":
            return torch.bmm(self._equal(a).transpose(1, 2), self._equal(b))
        if self.kind == "grouped":
            return torch._grouped_mm(a.t(), b, offs=self.offs)
        return torch.bmm(self._padded(a).transpose(1, 2), self._padded(b))

    def per_expert_sum(self, a: torch.Tensor) -> torch.Tensor:
        """[R, o] -> [E, o]: each expert's row sum."""
        if self.kind == "equal":
            return self._equal(a).sum(1)
        return a.new_zeros(self.num, a.shape[1]).index_add_(0, self.expert_of_row, a)


def _is_transposed(w: torch.Tensor) -> bool:
    """w [E, i, o] is a transposed view of a contiguous [E, o, i] tensor."""
    return w.stride(1) == 1 and w.stride(2) != 1 and w.transpose(1, 2).is_contiguous()


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, groups: _Groups) -> torch.Tensor:
        ctx.groups = groups
        ctx.save_for_backward(x, w)
        return groups.rows_times(x, w, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        groups: _Groups = ctx.groups
        grad = grad.contiguous()
        grad_x = groups.rows_times(grad, w.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # in w's memory layout: no layout-fixing copy in AccumulateGrad
            grad_w = groups.per_expert(grad, x).transpose(1, 2) if _is_transposed(w) else groups.per_expert(x, grad)
        grad_b = groups.per_expert_sum(grad) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                   counts: list[int] | GroupSizes) -> torch.Tensor:
    """[R, i] rows grouped by expert (`counts[e]` rows each) times w [E, i, o], plus bias [E, o] -> [R, o]."""
    sizes = GroupSizes.of(counts)
    if sizes.num != w.shape[0] or sizes.rows != x.shape[0]:
        raise ValueError(f"grouped_linear: counts {counts} do not split {x.shape[0]} rows over {w.shape[0]} experts")
    if torch.is_autocast_enabled(x.device.type):  # a custom function is not autocast by itself
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w, bias = x.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype)
    if x.dtype != w.dtype:
        raise TypeError(f"grouped_linear: rows are {x.dtype} but the expert weights are {w.dtype}")
    return _GroupedLinear.apply(x, w, bias, _Groups(sizes, x, w))
