"""Pure nn.Modules: the DiT backbone, its FFN slot (dense or MoE) and the diffusion objectives."""
from __future__ import annotations

from typing import TYPE_CHECKING

from models.dit import DiT, compile_model

if TYPE_CHECKING:  # models/ sits below engine/: the config is passed in, never imported at run time
    from engine.config import Config

__all__ = ["DiT", "build_model", "compile_model"]


def build_model(cfg: Config, ep_rank: int = 0, ep_size: int = 1) -> DiT:
    """The DiT of `cfg.model` holding expert-parallel rank `ep_rank`'s experts; blocks are
    torch.compiled in place when `model.compile` is set (compilation happens on the first call)."""
    model = DiT(cfg.model, ep_rank=ep_rank, ep_size=ep_size)
    if cfg.model.compile:
        compile_model(model)
    return model
