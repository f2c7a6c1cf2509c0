"""Parameter breakdown of a config's model: total and activated (applied per token) parameters.

    python -m engine.params configs/imagenet256/diffmoe_l_e16_flow.yaml [key=value ...]

The model is built on the meta device (no memory, no init), with every expert (ep_size 1).
Conventions (those of the DiffMoE paper's table): the fixed position table counts as a parameter
(DiT's convention); "activated" counts each MoE layer at its nominal routing rate (top-k experts
per token for token choice, `capacity` experts per token on average for expert choice), with the
router, shared experts and Diff-MoE's recalibration / conv / time modulation, and without the
capacity predictor (a training-time head that inference may skip); "total" counts everything.
The last line is JSON {"total": N, "activated": N}.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch import nn

from engine.config import Config, config_or_exit
from models import DiT
from models.moe import MoELayer, moe_layers

# (component, predicate on the parameter name inside a block's FFN slot), first match wins
_MOE_PARTS = [("experts", "experts."), ("router", "router."), ("predictor", "predictor."),
              ("shared experts", "shared."), ("recalibration", "recalibration.")]


_TOP = {"x_embedder": "embedding", "t_embedder": "embedding", "y_embedder": "embedding", "pos_embed": "embedding",
        "text_embedder": "text projection", "final_layer": "final layer"}
_BLOCK = {"attn": "attention", "cross_attn": "cross-attention", "adaLN_modulation": "adaLN modulation",
          "spatial": "spatial conv"}


def _component(name: str, ffn_of_block: dict[str, nn.Module]) -> str:
    parts = name.split(".")
    if parts[0] != "blocks":
        return _TOP.get(parts[0], parts[0])
    sub = parts[2]
    if sub != "ffn":
        return _BLOCK.get(sub, sub)
    if not isinstance(ffn_of_block[parts[1]], MoELayer):
        return "dense FFN"
    inner = ".".join(parts[3:])
    return next((label for label, prefix in _MOE_PARTS if inner.startswith(prefix)), parts[3])


def count_params(cfg: Config) -> tuple[dict[str, int], int, float]:
    """-> (parameters per component, total, activated) of cfg's model, built on the meta device."""
    with torch.device("meta"):
        model = DiT(cfg.model)
    ffn_of_block = {str(i): block.ffn for i, block in enumerate(model.blocks)}
    breakdown: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        breakdown[_component(name, ffn_of_block)] += p.numel()
    total = sum(breakdown.values())
    layers = list(moe_layers(model))
    in_moe = sum(p.numel() for layer in layers for p in layer.parameters())
    activated = total - in_moe + sum(layer.activated_params() for layer in layers)
    return dict(breakdown), total, activated


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    args = parser.parse_args(argv)
    cfg = config_or_exit(args.config, args.overrides)
    breakdown, total, activated = count_params(cfg)
    moe = cfg.model.moe
    print(f"{cfg.name}: depth {cfg.model.depth}, width {cfg.model.hidden_size}, routing {moe.routing}"
          + (f", {moe.num_experts} experts every {moe.every} block(s)" if moe.routing != "dense" else ""))
    for label, n in sorted(breakdown.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<18} {n / 1e6:>10.2f}M  ({n:,})")
    print(f"  {'total':<18} {total / 1e6:>10.2f}M")
    print(f"  {'activated':<18} {activated / 1e6:>10.2f}M  (per token; predictor excluded)"
          f" = {activated / 2**20:.2f} Mi (2^20 units, as the recipe's README)")
    print(json.dumps({"total": int(total), "activated": int(round(activated))}))


if __name__ == "__main__":
    main()
