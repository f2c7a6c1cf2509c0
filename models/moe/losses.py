"""Auxiliary losses of the MoE layers (returned unweighted; the layer applies the config weights)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def load_balance_loss(probs: torch.Tensor, choice_counts: torch.Tensor) -> torch.Tensor:
    """Switch / DeepSeek balance loss E * sum_e f_e * P_e.

    probs [T, E]: per-token router distribution; choice_counts [E]: how many top-k choices (before
    any capacity drop) went to each expert, over the whole pool. f_e = its share of all choices,
    P_e = mean probability of e. Equals 1 when routing is uniform, grows as load and probability
    concentrate on the same experts.
    """
    f = choice_counts.to(probs.dtype) / choice_counts.sum().clamp_min(1)
    return probs.shape[1] * (f * probs.mean(0)).sum()


def predictor_loss(logits: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of the capacity predictor against the expert-choice selection mask."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.binary_cross_entropy_with_logits(logits, selected.to(logits.dtype))
