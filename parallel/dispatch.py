"""All-to-all expert dispatch over the EP group, with the `LocalDispatcher` interface.

Experts are spread over the S ranks of the EP group, E/S consecutive global ids per rank. One
dispatch / combine:

    1. counts      all-to-all of [tokens, pairs] per destination rank (2 x 8 bytes per rank pair)
    2. hidden      all-to-all of each chosen (token, destination rank) pair's row, once: a token chosen
                   by several experts of one rank travels once (extras, e.g. conditioning, ride along)
    3. routing     all-to-all of one bit per local expert per sent token (which experts chose it) and
                   of the gate of every (token, expert) pair
    4. experts     the receiver expands tokens into (local expert, token) rows grouped by expert
    5. combine     the receiver sums gate * y over the experts of each received token, sends the sums
                   back (same row counts as step 2, reversed) and the sender adds them up per token

Everything is differentiable (`_AllToAll` reverses the exchange in backward), so gradients reach
the hidden states, the extras, the gates (hence the router) and the experts on their owner rank.
Chunks addressed to the sending rank itself are local copies and are not counted as sent. The same
code runs on NCCL (CUDA tensors stay on the device) and gloo; split sizes are host lists, as
`all_to_all_single` requires.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.moe.dispatcher import Routed, RoutingPlan
from parallel.comm_bytes import CommCounter, all_to_all_bytes


class _AllToAll(torch.autograd.Function):
    """Uneven `all_to_all_single` along dim 0; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_rows: list[int], recv_rows: list[int], exchange: "_Exchange",
                key: str) -> torch.Tensor:
        ctx.exchange, ctx.send_rows, ctx.recv_rows, ctx.key = exchange, send_rows, recv_rows, key
        return exchange.run(x, send_rows, recv_rows, key)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.exchange.run(grad, ctx.recv_rows, ctx.send_rows, ctx.key), None, None, None, None


@dataclass
class _Exchange:
    """The EP group, this rank's position in it, and the byte counter of one dispatcher."""

    group: dist.ProcessGroup
    position: int
    counter: CommCounter

    def run(self, x: torch.Tensor, send_rows: list[int], recv_rows: list[int], key: str) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((sum(recv_rows), *x.shape[1:]))
        dist.all_to_all_single(out, x, recv_rows, send_rows, group=self.group)
        self.counter.add(key, all_to_all_bytes(x, send_rows, self.position))
        return out

    def differentiable(self, x: torch.Tensor, send_rows: list[int], recv_rows: list[int], key: str) -> torch.Tensor:
        return _AllToAll.apply(x, send_rows, recv_rows, self, key)


@dataclass
class _RouteState:
    """What combine needs from dispatch."""

    send_token: torch.Tensor  # [S] local token index of each sent row, grouped by destination rank
    send_rows: list[int]  # rows sent to each rank of the group
    recv_rows: list[int]  # rows received from each rank
    pair_row: torch.Tensor  # [P] received row of each expert pair (pairs grouped by local expert)
    pair_gate: torch.Tensor  # [P] gate of each expert pair
    num_tokens: int


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[R, m] bool -> [R, ceil(m / 8)] uint8."""
    rows, m = mask.shape
    nbytes = -(-m // 8)
    padded = torch.zeros(rows, nbytes * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :m] = mask
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (padded.view(rows, nbytes, 8) * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, m: int) -> torch.Tensor:
    """[R, ceil(m / 8)] uint8 -> [R, m] bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    rows, nbytes = packed.shape
    return ((packed.unsqueeze(-1) >> shifts) & 1).view(rows, nbytes * 8)[:, :m].bool()


class AllToAllDispatcher:
    """Expert-parallel dispatcher of one MoE layer: this rank holds global experts
    [expert_offset, expert_offset + num_experts / ep_size) of `num_experts`."""

    def __init__(self, group: dist.ProcessGroup, ep_rank: int, ep_size: int, num_experts: int):
        if num_experts % ep_size:
            raise ValueError(f"parallel.ep_size: {ep_size} does not divide model.moe.num_experts={num_experts}")
        if dist.get_world_size(group) != ep_size or dist.get_rank(group) != ep_rank:
            raise ValueError(f"EP group of size {dist.get_world_size(group)} (rank {dist.get_rank(group)}) does not "
                             f"match ep_size={ep_size}, ep_rank={ep_rank}")
        self.ep_size = ep_size
        self.num_local = num_experts // ep_size
        self.expert_offset = ep_rank * self.num_local
        self.counter = CommCounter()
        self._exchange = _Exchange(group, ep_rank, self.counter)

    def dispatch(self, plan: RoutingPlan, x: torch.Tensor, *extras: torch.Tensor) -> Routed:
        n, m, num_tokens = self.ep_size, self.num_local, plan.num_tokens
        device = x.device
        dest, local_expert = plan.expert_index // m, plan.expert_index % m
        # chosen[dest * T + token, local expert]: one row per (destination rank, token) pair.
        slot = dest * num_tokens + plan.token_index
        chosen = torch.zeros(n * num_tokens, m, dtype=torch.bool, device=device)
        chosen[slot, local_expert] = True
        sent = chosen.any(1).nonzero().squeeze(1)  # sorted by destination, then token
        send_token = sent % num_tokens
        pair_order = torch.argsort(slot * m + local_expert)  # pairs in (destination, token, expert) order

        counts = torch.stack([torch.bincount(sent // num_tokens, minlength=n), torch.bincount(dest, minlength=n)], 1)
        recv_counts = self._exchange.run(counts, [1] * n, [1] * n, "metadata_bytes").tolist()
        send_rows, send_pairs = counts[:, 0].tolist(), counts[:, 1].tolist()
        recv_rows, recv_pairs = [c[0] for c in recv_counts], [c[1] for c in recv_counts]

        ex = self._exchange
        tokens = ex.differentiable(x[send_token], send_rows, recv_rows, "alltoall_bytes")
        recv_extras = [ex.differentiable(e[send_token], send_rows, recv_rows, "alltoall_extra_bytes") for e in extras]
        bits = _unpack_bits(ex.run(_pack_bits(chosen[sent]), send_rows, recv_rows, "metadata_bytes"), m)
        gates = ex.differentiable(plan.gate[pair_order], send_pairs, recv_pairs, "metadata_bytes")

        # Expand received rows into (local expert, row) pairs grouped by expert; rows come in
        # (source rank, token) order, i.e. pool order. Gates arrived in (row, expert) order.
        local_of_pair, row_of_pair = bits.t().nonzero(as_tuple=True)
        gate_index = (bits.flatten().cumsum(0) - 1).view(bits.shape)[row_of_pair, local_of_pair]
        state = _RouteState(send_token, send_rows, recv_rows, row_of_pair, gates[gate_index], num_tokens)
        return Routed(tokens[row_of_pair], torch.bincount(local_of_pair, minlength=m).tolist(),
                      [e[row_of_pair] for e in recv_extras], state=state)

    def combine(self, expert_out: torch.Tensor, routed: Routed) -> torch.Tensor:
        s: _RouteState = routed.state
        weighted = expert_out * s.pair_gate.unsqueeze(-1).to(expert_out.dtype)
        per_row = expert_out.new_zeros(sum(s.recv_rows), expert_out.shape[-1]).index_add(0, s.pair_row, weighted)
        back = self._exchange.differentiable(per_row, s.recv_rows, s.send_rows, "alltoall_bytes")
        return expert_out.new_zeros(s.num_tokens, expert_out.shape[-1]).index_add(0, s.send_token, back)
