"""Exponential moving average of the model's parameters, kept in fp32.

    ema = EMA(engine.module)
    ...after each optimizer step:  ema.update(engine.module, decay)   # shadow <- decay shadow + (1 - decay) p

Under ZeRO stage 1/2 every rank holds the full module parameters after `engine.step()` (the
updated partitions are all-gathered), so each rank's shadow tracks the whole dense model. Expert
tensors are this rank's expert-parallel shard; names are the module's own parameter names.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module):
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32, copy=True) for name, p in model.named_parameters()}

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = dict(model.named_parameters())
        if params.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - params.keys(), params.keys() - self.shadow.keys()
            raise KeyError(f"EMA and model parameters differ: missing in model {sorted(missing)[:5]}, "
                           f"not in EMA {sorted(extra)[:5]}")
        names = list(self.shadow)
        return [self.shadow[n] for n in names], [params[n] for n in names]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """shadow <- decay * shadow + (1 - decay) * param, for every parameter (one fused op)."""
        shadow, params = self._pairs(model)
        torch._foreach_lerp_(shadow, [p.detach().float() for p in params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averages (cast to each parameter's dtype)."""
        shadow, params = self._pairs(model)
        for s, p in zip(shadow, params):
            p.copy_(s)

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run `model` with the EMA weights inside the block; its own weights are restored after."""
        saved = [p.detach().clone() for p in self._pairs(model)[1]]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, s in zip(self._pairs(model)[1], saved):
                    p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(extra)[:5]}")
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state '{name}' has shape {tuple(value.shape)}, "
                                 f"the model's is {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)
