"""The MoE layer benchmark's FLOP counts (the floor it reports) against closed-form counts."""
from __future__ import annotations

import pytest
import torch

from benchmarks.moe_layer import Case, count_flops, moe_layer, ours
from models.ffn import DenseFFN

D, E, B, N = 16, 4, 2, 8  # width, experts, samples, tokens per sample
T, H = B * N, 4 * D


def flops_of(module: torch.nn.Module) -> int:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, D, generator=g).requires_grad_()
    c, t, grad = torch.randn(B, D, generator=g), torch.rand(B, generator=g), torch.randn(B, N, D, generator=g)
    module.train()
    return count_flops(Case("case", module, "case", "", ours), x, c, t, grad)


# One training iteration = forward + gradients of the input and the weights: 3 x the forward matmuls,
# except where the input is detached. Experts: 2 matmuls of d x 4d per (token, expert) pair.
EXPERTS = 3 * 2 * 2 * D * H
ROUTER = 3 * 2 * D * E
PREDICTOR = 2 * 2 * D * D + 3 * 2 * D * E  # fc1 on the detached state: forward + weight gradient only


@pytest.mark.parametrize("name, kwargs, per_token", [
    ("dense", None, EXPERTS),
    ("diffmoe", dict(routing="diffmoe", num_experts=E, capacity=1.0), EXPERTS + ROUTER + PREDICTOR),
    ("diffmoe, no predictor", dict(routing="diffmoe", num_experts=E, capacity=1.0, predictor=False), EXPERTS + ROUTER),
    ("token_choice top-2", dict(routing="token_choice", num_experts=E, top_k=2, drop_tokens=False),
     2 * EXPERTS + ROUTER),  # unequal groups: the torch._grouped_mm kernel, counted by the benchmark's formula
])
def test_training_iteration_flops_match_the_closed_form(name, kwargs, per_token):
    module = DenseFFN(D, H) if kwargs is None else moe_layer(D, **kwargs)
    assert flops_of(module) == T * per_token, name

