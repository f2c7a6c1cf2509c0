"""Routing rules of the MoE layers on hand-computed tiny cases (selection functions, capacity
arithmetic, losses, the sigmoid_bias update) — no layer around them."""
from __future__ import annotations

import pytest
import torch

from models.moe import selection
from models.moe.losses import load_balance_loss, predictor_loss
from models.moe.pool import LocalPool
from models.moe.router import Router

torch.set_num_threads(1)


def test_capacity_arithmetic():
    assert selection.expert_choice_k(2048, 16, 1.0) == 128  # S size: 8 x 256 tokens, E16
    assert selection.expert_choice_k(100, 16, 1.0) == 6  # int(6.25)
    assert selection.expert_choice_k(100, 16, 2.0) == 12  # int(12.5)
    assert selection.expert_choice_k(256, 16, 16.0) == 256  # capacity E: every expert takes every token
    assert selection.expert_choice_k(4, 16, 1.0) == 1  # never 0
    assert selection.token_choice_capacity(2048, 16, 2, 1.25) == 320  # 1.25 * 2048 * 2 / 16
    assert selection.token_choice_capacity(10, 4, 1, 1.0) == 2  # int(2.5)


# 4 tokens, 3 experts: rows are the router's softmax scores
SCORES = torch.tensor([[0.5, 0.3, 0.2],
                       [0.1, 0.6, 0.3],
                       [0.2, 0.2, 0.6],
                       [0.7, 0.2, 0.1]])


def test_token_choice_top1_and_capacity_drop():
    chosen, experts = selection.top_k_choice(SCORES, 1)
    assert chosen.nonzero().tolist() == [[0, 0], [1, 1], [2, 2], [3, 0]]
    assert experts.tolist() == [[0], [1], [2], [0]]
    weights = selection.token_choice_weights(SCORES, chosen, normalize=False, scaling=1.0)
    assert torch.equal(weights, SCORES * chosen)
    # capacity int(0.75 * 4 * 1 / 3) = 1: expert 0 keeps token 3 (0.7) and drops token 0 (0.5)
    cap = selection.token_choice_capacity(4, 3, 1, 0.75)
    kept = selection.drop_over_capacity(chosen, SCORES, LocalPool("micro_batch"), cap, tokens_per_sample=4)
    assert kept.nonzero().tolist() == [[1, 1], [2, 2], [3, 0]]
    # with pool=sample (2 tokens per sample) each sample has its own capacity int(0.75*2/3)=max(1,0)=1
    kept = selection.drop_over_capacity(chosen, SCORES, LocalPool("sample"), 1, tokens_per_sample=2)
    assert kept.nonzero().tolist() == [[0, 0], [1, 1], [2, 2], [3, 0]]


def test_token_choice_top2_renormalised_and_scaled():
    chosen, experts = selection.top_k_choice(SCORES, 2)
    assert chosen.nonzero().tolist() == [[0, 0], [0, 1], [1, 1], [1, 2], [2, 0], [2, 2], [3, 0], [3, 1]]
    assert experts.tolist() == [[0, 1], [1, 2], [2, 0], [0, 1]]  # best first
    # token 2 ties 0.2/0.2 between experts 0 and 1: the lower id wins
    w = selection.token_choice_weights(SCORES, chosen, normalize=True, scaling=2.0)
    assert torch.allclose(w[0], torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0]) * 2)
    assert torch.allclose(w.sum(1), torch.full((4,), 2.0))


def test_expert_choice_over_pools():
    # micro_batch pool (4 tokens), k = int(4 / 3 * 1.5) = 2 per expert
    k = selection.expert_choice_k(4, 3, 1.5)
    assert k == 2
    mask = LocalPool("micro_batch").topk_mask(SCORES, k, tokens_per_sample=2)
    # expert 0: tokens 3 (0.7), 0 (0.5); expert 1: 1 (0.6), 0 (0.3); expert 2: 2 (0.6), 1 (0.3)
    assert mask.t().nonzero().tolist() == [[0, 0], [0, 3], [1, 0], [1, 1], [2, 1], [2, 2]]
    # token 0 is taken by two experts, token 3 by one: a token gets 0..E experts
    assert mask.sum(1).tolist() == [2, 2, 1, 1]
    # pool=sample: samples {0,1} and {2,3}, one token per expert each
    mask = LocalPool("sample").topk_mask(SCORES, 1, tokens_per_sample=2)
    assert mask.t().nonzero().tolist() == [[0, 0], [0, 3], [1, 1], [1, 2], [2, 1], [2, 2]]
    # finite scores: every expert takes exactly k tokens of each pool, so the positions come without nonzero
    for scope, k, n in (("micro_batch", 2, 2), ("sample", 1, 2)):
        chosen = LocalPool(scope).select(SCORES, k, tokens_per_sample=n, finite=True)
        assert chosen.index.tolist() == [row.nonzero().squeeze(1).tolist() for row in chosen.mask.t()]


def test_dynamic_choice_takes_n_best_by_router_score():
    eligible = torch.tensor([[True, False, False],
                             [False, False, False],
                             [True, False, True],
                             [False, False, False]])  # n = [2, 0, 1]
    mask = selection.dynamic_choice(SCORES, eligible, group_tokens=4)
    # expert 0 takes its 2 best tokens by score (3: 0.7, 0: 0.5), not the eligible ones (0, 2)
    assert mask.t().nonzero().tolist() == [[0, 0], [0, 3], [2, 2]]


def test_dynamic_choice_per_sample_counts_and_ranks_within_each_sample():
    eligible = torch.tensor([[True, False, False],
                             [True, False, False],
                             [False, False, False],
                             [False, False, True]])
    # one pool over the batch: n = [2, 0, 1] -> expert 0 takes 3 (0.7) and 0 (0.5), expert 2 takes 2 (0.6)
    assert selection.dynamic_choice(SCORES, eligible, 4).t().nonzero().tolist() == [[0, 0], [0, 3], [2, 2]]
    # samples {0, 1} and {2, 3}: n = [2, 0, 0] then [0, 0, 1] -> expert 0 takes 0 and 1, expert 2 takes 2
    assert selection.dynamic_choice(SCORES, eligible, 2).t().nonzero().tolist() == [[0, 0], [0, 1], [2, 2]]


def test_load_balance_loss_closed_form():
    uniform = torch.full((8, 4), 0.25)
    balanced = torch.eye(4, dtype=torch.bool).repeat(2, 1)
    assert load_balance_loss(uniform, balanced.sum(0)).item() == pytest.approx(1.0)
    # every token picks expert 0 whose mean probability is 0.7: E * 1 * 0.7
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    all_zero = torch.zeros(8, 4, dtype=torch.bool)
    all_zero[:, 0] = True
    assert load_balance_loss(probs, all_zero.sum(0)).item() == pytest.approx(4 * 0.7)


def test_predictor_loss_is_bce_against_mask():
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    mask = torch.tensor([[True, False], [False, True]])
    p = torch.sigmoid(logits)
    expected = -(torch.log(p[0, 0]) + torch.log(1 - p[0, 1]) + torch.log(1 - p[1, 0]) + torch.log(p[1, 1])) / 4
    assert predictor_loss(logits, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_sigmoid_bias_router_selects_on_biased_scores_and_updates_toward_balance():
    router = Router(2, 4, "sigmoid_bias", block_index=0)
    with torch.no_grad():
        router.weight.zero_()
        router.balance_bias.copy_(torch.tensor([0.0, 0.3, 0.0, 0.0]))
    affinity, select = router(torch.randn(3, 2))
    assert torch.allclose(affinity, torch.full((3, 4), 0.5))  # sigmoid(0): unbiased weights
    assert torch.allclose(select[:, 1], torch.full((3,), 0.8))  # biased selection score
    assert selection.top_k_choice(select, 1)[0][:, 1].all()
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]), rate=0.01)  # mean 5
    assert torch.allclose(router.balance_bias, torch.tensor([-0.01, 0.31, 0.0, 0.0]))  # over down, under up
    assert router.load.abs().sum() == 0


@pytest.mark.parametrize("overrides, key", [
    (["model.moe.routing=diffmoe", "model.moe.router=sigmoid_bias"], "model.moe.router"),
    (["model.moe.routing=diffmoe", "model.moe.predictor=false", "model.moe.inference=dynamic"], "model.moe.inference"),
    (["model.moe.capacity_schedule_stage1=10", "model.moe.capacity_schedule_stage2=5"], "model.moe.capacity_schedule_stage2"),
    (["model.moe.spatial_conv_kernel=4"], "model.moe.spatial_conv_kernel"),
    (["model.moe.threshold_ema=1.0"], "model.moe.threshold_ema"),
])
def test_moe_config_errors_name_the_key(overrides, key):
    from engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)
