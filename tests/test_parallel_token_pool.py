"""Cross-rank token pools on real gloo ranks == LocalPool('micro_batch') on the concatenated batch."""
from __future__ import annotations

import pytest
import torch

from models.moe.pool import LocalPool

pytestmark = pytest.mark.slow

T, E, N_PER_SAMPLE = 12, 4, 4  # tokens per rank, experts, tokens per sample


def make_scores(kind: str, rows: int, seed: int) -> torch.Tensor:
    """[rows, E] scores of one kind; identical on every rank (the whole job's batch)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(rows, E, generator=g)
    if kind == "ties":  # few distinct values: ties straddle every threshold, across ranks
        return torch.randint(0, 3, (rows, E), generator=g).float()
    if kind == "all_equal":
        return torch.full((rows, E), 0.25)
    if kind == "neg_inf":  # -inf entries, an expert with none finite, one with fewer finite than k
        s = torch.randn(rows, E, generator=g).masked_fill(torch.rand(rows, E, generator=g) < 0.3, float("-inf"))
        s[:, 0] = float("-inf")
        s[: rows - 2, 1] = float("-inf")
        return s
    if kind == "signed_zero":  # +-0, denormals, +-inf, huge values: the float -> key ordering
        vals = torch.tensor([0.0, -0.0, 1e-40, -1e-40, float("inf"), -3e38, 3e38, -1.0, 1.0, 0.5])
        return vals[torch.randint(0, len(vals), (rows, E), generator=g)]
    if kind == "softmax":  # realistic router probabilities, close together
        return torch.softmax(0.01 * torch.randn(rows, E, generator=g), -1)
    if kind == "bf16":
        return torch.randn(rows, E, generator=g).bfloat16()
    raise ValueError(kind)


KINDS = ["random", "ties", "all_equal", "neg_inf", "signed_zero", "softmax", "bf16"]


def pool_ranks(scope: str, rank: int, world: int, ep_size: int) -> list[int]:
    if scope == "world":
        return list(range(world))
    if scope == "ep_group":
        first = rank - rank % ep_size
        return list(range(first, first + ep_size))
    return [rank]


def _select_on_rank(ep_size: int, cases: list[tuple]) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Run every case on this rank: (topk mask of own tokens, kth_largest, drained byte counters)."""
    import torch.distributed as dist

    from parallel.groups import create_groups
    from parallel.token_pool import build_pool

    groups = create_groups(ep_size)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for scope, selection, kind, k, tokens in cases:
        scores = make_scores(kind, world * tokens, seed=k)[rank * tokens:(rank + 1) * tokens]
        pool = build_pool(scope, groups, selection)
        mask = pool.topk_mask(scores, k, N_PER_SAMPLE)
        # the k-th largest of a second set of values rides along the same selection
        chosen = pool.select(scores, k, N_PER_SAMPLE, kth_of=scores) if kind != "neg_inf" else None
        assert chosen is None or torch.equal(chosen.mask, mask)
        kth = chosen.kth if chosen is not None else torch.zeros(E)
        counter = getattr(pool, "counter", None)
        out.append((mask, kth, counter.drain() if counter else {}))
    return out


def reference(scope: str, kind: str, k: int, tokens: int, world: int, ep_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Single process: LocalPool over each pool's concatenated rows; kth averaged over pools."""
    scores = make_scores(kind, world * tokens, seed=k)
    local_scope = "sample" if scope == "sample" else "micro_batch"
    masks, kths = [], []
    for rank in range(world):
        ranks = pool_ranks(scope, rank, world, ep_size)
        rows = torch.cat([scores[r * tokens:(r + 1) * tokens] for r in ranks])
        mask = LocalPool(local_scope).topk_mask(rows, k, N_PER_SAMPLE)
        pos = ranks.index(rank)
        masks.append(mask[pos * tokens:(pos + 1) * tokens])
        kths.append(LocalPool(local_scope).select(rows, k, N_PER_SAMPLE, kth_of=rows).kth.double())
    return torch.cat(masks), torch.stack(kths).mean(0).to(scores.dtype)


def cases_for(world: int, ep_size: int) -> list[tuple]:
    pool = world * T
    ks = [1, 5, pool // E, pool - 1, pool, pool + 3]
    return [(scope, selection, kind, k, T)
            for scope in ("ep_group", "world") for selection in ("radix", "gather") for kind in KINDS for k in ks]


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 2)])
def test_cross_rank_topk_equals_single_process(pools, world, ep_size):
    cases = cases_for(world, ep_size)
    results = pools(world).run(_select_on_rank, ep_size, cases)
    for i, (scope, selection, kind, k, tokens) in enumerate(cases):
        want_mask, want_kth = reference(scope, kind, k, tokens, world, ep_size)
        got_mask = torch.cat([results[r][i][0] for r in range(world)])
        assert torch.equal(got_mask, want_mask), f"mask differs: {scope} {selection} {kind} k={k}"
        if kind != "neg_inf":
            kths = [results[r][i][1] for r in range(world)]
            assert all(torch.equal(kths[0], x) for x in kths), f"kth differs across ranks: {scope} {selection} {kind}"
            torch.testing.assert_close(kths[0], want_kth, msg=f"kth: {scope} {selection} {kind} k={k}")


def test_local_scopes_average_thresholds_over_ranks(pools):
    """sample / micro_batch at world 2: local top-k, kth_largest the mean over every pool of the job."""
    cases = [(scope, "radix", kind, k, T) for scope in ("sample", "micro_batch") for kind in ("random", "ties") for k in (1, 3)]
    results = pools(2).run(_select_on_rank, 1, cases)
    for i, (scope, _, kind, k, tokens) in enumerate(cases):
        want_mask, _ = reference(scope, kind, k, tokens, 2, 1)
        assert torch.equal(torch.cat([results[r][i][0] for r in range(2)]), want_mask)
        scores = make_scores(kind, 2 * tokens, seed=k)
        n = N_PER_SAMPLE if scope == "sample" else tokens
        want_kth = LocalPool("sample").select(scores, k, n, kth_of=scores).kth  # mean over all pools of the job
        for r in range(2):
            torch.testing.assert_close(results[r][i][1], want_kth)


def test_radix_metadata_does_not_grow_with_tokens(pools):
    """Radix selection metadata is the same at 16 and 1024 tokens per rank (a fixed schedule of
    fixed-size histograms); the score all-gather grows with T."""
    from parallel.token_pool import BINS, ROUNDS

    cases = [("ep_group", sel, "random", 7, tokens) for sel in ("radix", "gather") for tokens in (16, 1024)]
    results = pools(2).run(_select_on_rank, 2, cases)
    radix_small, radix_big, gather_small, gather_big = (results[0][i][2] for i in range(4))
    # topk_mask, then select with kth_of (2E columns): ROUNDS - 1 all-reduces of C x BINS int32 (+ the
    # token count in round 1), one all-gather of C x BINS int16; on 2 ranks each sends its tensor once.
    per_select = [(ROUNDS - 1) * c * BINS * 4 + 4 + c * BINS * 2 for c in (E, 2 * E)]
    for sent in (radix_small, radix_big):
        assert sent["metadata_bytes"] == sum(per_select) and "score_gather_bytes" not in sent
    assert gather_big["score_gather_bytes"] == 64 * gather_small["score_gather_bytes"]


def _pool_sums(ep_size: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    from parallel.groups import create_groups
    from parallel.token_pool import build_pool

    groups = create_groups(ep_size)
    mine = torch.tensor([dist.get_rank() + 1.0, 1.0])
    return [build_pool(scope, groups, "radix").pool_sum(mine) for scope in ("ep_group", "world")]


def test_pool_sum_adds_over_the_pool_ranks(pools):
    results = pools(4).run(_pool_sums, 2)
    for rank, (ep_group, world) in enumerate(results):
        assert ep_group.tolist() == ([3.0, 2.0] if rank < 2 else [7.0, 2.0])
        assert world.tolist() == [10.0, 4.0]
