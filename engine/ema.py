"""Exponential moving average of the model's parameters and floating-point state buffers, kept in fp32.

    ema = EMA(engine.module)
    ...after each optimizer step:  ema.update(engine.module, decay)   # shadow <- decay shadow + (1 - decay) p

Under ZeRO stage 1/2 every rank holds the full module parameters after `engine.step()` (the
updated partitions are all-gathered), so each rank's shadow tracks the whole dense model. Expert
tensors are this rank's expert-parallel shard; names are the module's own state-dict names.

Persistent floating-point buffers (the capacity predictor's thresholds, the sigmoid_bias router's
balancing bias) are averaged with the same decay, as the DiffMoE reference's EMA model does: sampling
with the EMA weights then uses EMA'd thresholds. Non-persistent buffers (load counts) are not tracked.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _tracked(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent floating-point buffers, by state-dict name (the objects themselves)."""
    return {name: t for name, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()}


class EMA:
    def __init__(self, model: nn.Module):
        self.shadow: dict[str, torch.Tensor] = {
            name: t.detach().to(torch.float32, copy=True) for name, t in _tracked(model).items()}

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = _tracked(model)
        if params.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - params.keys(), params.keys() - self.shadow.keys()
            raise KeyError(f"EMA and model tensors differ: missing in model {sorted(missing)[:5]}, "
                           f"not in EMA {sorted(extra)[:5]}")
        names = list(self.shadow)
        return [self.shadow[n] for n in names], [params[n] for n in names]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """shadow <- decay * shadow + (1 - decay) * value, for every tracked tensor (one fused op)."""
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
