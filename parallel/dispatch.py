"""All-to-all expert dispatch over the EP group, with the `LocalDispatcher` interface.

Experts are spread over the S ranks of the EP group, E/S consecutive global ids per rank. One
dispatch + combine is three collectives and one device->host sync, on a fixed schedule:

    1. counts   one all-to-all of, per destination rank: token rows, sample rows and pairs per local
                expert; read back to the host together with the selection's deferred checks in ONE
                transfer (the layer's only host sync: `all_to_all_single` takes host split sizes)
    2. payload  one all-to-all carrying, per (token, destination rank) pair, the token's hidden state
                once (a token chosen by several experts of one rank travels once), the gate of every
                local expert of that rank (0 where not chosen; in the hidden states' dtype, which
                combine casts it to anyway), one bit per local expert, and, with
                side inputs, the token's sample slot; and per (sample, destination rank) pair the
                sample's side inputs once (time-aware conditioning, recalibration means). All of it
                is packed into one byte buffer, so mixed dtypes share one collective.
    3. combine  the receiver sums gate * y over the experts of each received token and sends one row
                back per received token; the sender adds its tokens' rows up.

Indices are built on the device without nonzero/bincount: their sizes come from step 1's host
counts. Payload and combine are differentiable; their backward is the reverse exchange, one
collective each. The payload exchange is asynchronous: the layer runs work that does not need the
routed tokens (the shared experts) while it is in flight, and the first read of `Routed.tokens`
waits for it; in backward the payload's reverse exchange likewise overlaps the shared experts'
backward. Chunks addressed to the sending rank itself are local copies and are not counted as sent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.moe.dispatcher import Routed, RoutingPlan, verify_checks
from models.moe.grouped_mm import GroupSizes
from models.moe.pool import mask_positions
from parallel.comm_bytes import CommCounter, all_to_all_bytes


def _row_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


@dataclass
class _RouteState:
    """What combine needs from dispatch."""

    send_token: torch.Tensor  # [S] local token of each sent row, grouped by destination rank
    rows_out: list[int]  # rows sent to each rank of the group
    rows_in: list[int]  # rows received from each rank
    num_tokens: int


class _PackedExchange:
    """One all-to-all of several tensors, each [rows, ...] grouped by peer, packed into one byte buffer.

    Tensor i is of row kind `kind_of[i]` (e.g. tokens, samples); `rows_out[kind][peer]` rows of that
    kind go to each peer and `rows_in[kind][peer]` come from it. `launch` / `land` run one direction
    (forward: out -> in; backward: the reverse, carrying the floating tensors' gradients)."""

    def __init__(self, group: dist.ProcessGroup, position: int, counter: CommCounter, rows_out: list[list[int]],
                 rows_in: list[list[int]], kind_of: list[int], keys: list[str]):
        self.group, self.position, self.counter = group, position, counter
        self.rows = {True: (rows_out, rows_in), False: (rows_in, rows_out)}
        self.kind_of, self.keys = kind_of, keys
        self.like: list[tuple[torch.dtype, tuple[int, ...]]] = []
        self.pending = None

    def _members(self, forward: bool) -> list[int]:
        """Tensors that travel: all forward, the floating ones (gradients) backward."""
        return [i for i, (dtype, _) in enumerate(self.like) if forward or dtype.is_floating_point]

    def launch(self, tensors: list[torch.Tensor], forward: bool) -> None:
        """`tensors`: all of them forward; backward the gradients of the floating ones, in order."""
        if forward:
            self.like = [(t.dtype, tuple(t.shape[1:])) for t in tensors]
        members = self._members(forward)
        rows_out, rows_in = self.rows[forward]
        widths = [_row_bytes(*self.like[i]) for i in members]
        data = [t.reshape(t.shape[0], math.prod(t.shape[1:])).contiguous().view(torch.uint8) for t in tensors]
        peers = len(rows_out[0])
        pieces, send, recv = [], [0] * peers, [0] * peers
        starts = [0] * len(members)
        for peer in range(peers):
            for j, i in enumerate(members):
                n = rows_out[self.kind_of[i]][peer]
                pieces.append(data[j][starts[j]:starts[j] + n].reshape(-1))
                starts[j] += n
                send[peer] += n * widths[j]
                recv[peer] += rows_in[self.kind_of[i]][peer] * widths[j]
        flat = torch.cat(pieces)
        out = flat.new_empty(sum(recv))
        work = dist.all_to_all_single(out, flat, recv, send, group=self.group, async_op=True)
        for j, i in enumerate(members):
            self.counter.add(self.keys[i], all_to_all_bytes(data[j], rows_out[self.kind_of[i]], self.position))
        self.pending = (work, out, recv, flat)

    def land(self, forward: bool) -> list[torch.Tensor]:
        work, out, recv, _ = self.pending
        self.pending = None
        work.wait()
        members = self._members(forward)
        rows_in = self.rows[forward][1]
        widths = [_row_bytes(*self.like[i]) for i in members]
        parts: list[list[torch.Tensor]] = [[] for _ in members]
        offset = 0
        for peer in range(len(recv)):
            for j, i in enumerate(members):
                n = rows_in[self.kind_of[i]][peer] * widths[j]
                parts[j].append(out[offset:offset + n])
                offset += n
        result = []
        for j, i in enumerate(members):
            dtype, shape = self.like[i]
            result.append(torch.cat(parts[j]).view(dtype).reshape(-1, *shape))
        return result


class _Launch(torch.autograd.Function):
    """Forward: pack and launch the exchange; returns an empty tensor that orders `_Land` after it.
    Backward: wait for the reverse exchange of the gradients and hand them to the inputs."""

    @staticmethod
    def forward(ctx, exchange: _PackedExchange, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.exchange = exchange
        exchange.launch(list(tensors), forward=True)
        return tensors[0].new_empty(0)

    @staticmethod
    def backward(ctx, _unused: torch.Tensor):
        exchange: _PackedExchange = ctx.exchange
        grads = iter(exchange.land(forward=False))
        return (None, *(next(grads) if dtype.is_floating_point else None for dtype, _ in exchange.like))


class _Land(torch.autograd.Function):
    """Forward: wait for the exchange and unpack. Backward: launch the reverse exchange of the gradients."""

    @staticmethod
    def forward(ctx, exchange: _PackedExchange, order: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.exchange = exchange
        ctx.order_like = (order.dtype, order.device)
        outs = exchange.land(forward=True)
        ctx.mark_non_differentiable(*(t for t in outs if not t.dtype.is_floating_point))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        exchange: _PackedExchange = ctx.exchange
        order_dtype, device = ctx.order_like
        floats = []
        for (dtype, shape), g, rows in zip(exchange.like, grads, _landed_rows(exchange)):
            if dtype.is_floating_point:
                floats.append(g if g is not None else torch.zeros((rows, *shape), dtype=dtype, device=device))
        exchange.launch(floats, forward=False)
        return None, torch.empty(0, dtype=order_dtype, device=device)


def _landed_rows(exchange: _PackedExchange) -> list[int]:
    rows_in = exchange.rows[True][1]
    return [sum(rows_in[kind]) for kind in exchange.kind_of]


def _start(exchange: _PackedExchange, tensors: list[torch.Tensor]):
    """Launch now; the returned function waits and returns the received tensors (differentiably)."""
    order = _Launch.apply(exchange, *tensors)
    return lambda: _Land.apply(exchange, order)


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


def _positions(flags: torch.Tensor, count: int) -> torch.Tensor:
    """[L] bool with `count` True entries -> their indices, ascending (no device->host sync)."""
    return mask_positions(flags.view(-1, 1), count).view(-1)


def _exclusive_cumsum(t: torch.Tensor) -> torch.Tensor:
    return t.cumsum(0) - t


class AllToAllDispatcher:
    """Expert-parallel dispatcher of one MoE layer: this rank holds global experts
    [expert_offset, expert_offset + num_experts / ep_size) of `num_experts`."""

    def __init__(self, group: dist.ProcessGroup, ep_rank: int, ep_size: int, num_experts: int):
        if num_experts % ep_size:
            raise ValueError(f"parallel.ep_size: {ep_size} does not divide model.moe.num_experts={num_experts}")
        if dist.get_world_size(group) != ep_size or dist.get_rank(group) != ep_rank:
            raise ValueError(f"EP group of size {dist.get_world_size(group)} (rank {dist.get_rank(group)}) does not "
                             f"match ep_size={ep_size}, ep_rank={ep_rank}")
        self.group, self.position = group, ep_rank
        self.ep_size = ep_size
        self.num_local = num_experts // ep_size
        self.expert_offset = ep_rank * self.num_local
        self.counter = CommCounter()

    def _exchange(self, rows_out: list[list[int]], rows_in: list[list[int]], kind_of: list[int],
                  keys: list[str]) -> _PackedExchange:
        return _PackedExchange(self.group, self.position, self.counter, rows_out, rows_in, kind_of, keys)

    def _exchange_counts(self, counts: torch.Tensor, checks: tuple) -> tuple[torch.Tensor, list[int], list[int]]:
        """All-to-all of [n, c] int64 counts (row p for peer p) -> (received counts on the device, sent and
        received counts on the host). The host copy is the layer's one device->host sync; the deferred
        checks of the selection ride in it."""
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        self.counter.add("metadata_bytes", all_to_all_bytes(counts, [1] * self.ep_size, self.position))
        host = torch.cat([counts.flatten(), received.flatten(), *(c[0].view(1).to(counts.dtype) for c in checks)])
        host = host.tolist()
        size = counts.numel()
        verify_checks(checks, host[2 * size:])
        return received, host[:size], host[size:2 * size]

    def dispatch(self, plan: RoutingPlan, x: torch.Tensor, sample_inputs: tuple[torch.Tensor, ...] = ()) -> Routed:
        n, m, num_tokens = self.ep_size, self.num_local, plan.num_tokens
        chosen = plan.mask.view(num_tokens, n, m).transpose(0, 1)  # [n, T, m]: by destination rank
        goes = chosen.any(2)  # [n, T]: the token travels to that rank
        columns = [goes.sum(1, keepdim=True)]
        if sample_inputs:  # samples with at least one token going to that rank
            per_sample = plan.tokens_per_sample
            sample_goes = goes.view(n, num_tokens // per_sample, per_sample).any(2)  # [n, B]
            columns.append(sample_goes.sum(1, keepdim=True))
        columns.append(chosen.sum(1))  # [n, m] pairs per local expert of each destination
        received, sent_host, recv_host = self._exchange_counts(torch.cat(columns, 1), plan.checks)
        width = len(columns) - 1 + m
        sent_counts = [sent_host[p * width:(p + 1) * width] for p in range(n)]
        recv_counts = [recv_host[p * width:(p + 1) * width] for p in range(n)]

        # Send side: rows in (destination, token) order, built from the host totals.
        rows_out = [[c[0] for c in sent_counts]]
        rows_in = [[c[0] for c in recv_counts]]
        sent = _positions(goes.reshape(-1), sum(rows_out[0]))
        send_token = sent % num_tokens
        gates = torch.where(plan.mask, plan.weights, 0).view(num_tokens, n, m).transpose(0, 1).reshape(n * num_tokens, m)
        # Gates travel in the hidden states' dtype: combine casts them to the experts' output dtype anyway.
        tensors = [x.index_select(0, send_token), gates.index_select(0, sent).to(x.dtype),
                   _pack_bits(chosen.reshape(n * num_tokens, m).index_select(0, sent))]
        keys = ["alltoall_bytes", "metadata_bytes", "metadata_bytes"]
        kind_of = [0, 0, 0]
        if sample_inputs:
            num_samples = num_tokens // plan.tokens_per_sample
            rows_out.append([c[1] for c in sent_counts])
            rows_in.append([c[1] for c in recv_counts])
            flat_goes = sample_goes.reshape(-1)
            sent_samples = _positions(flat_goes, sum(rows_out[1]))
            # a token's sample slot: the sample's place among those going to the same rank
            slot = (flat_goes.cumsum(0) - 1).view(n, num_samples) - _exclusive_cumsum(sample_goes.sum(1)).unsqueeze(1)
            token_sample = (sent // num_tokens) * num_samples + send_token // plan.tokens_per_sample
            tensors.append(slot.reshape(-1).index_select(0, token_sample).to(torch.int32))
            keys.append("metadata_bytes")
            kind_of.append(0)
            for side in sample_inputs:
                tensors.append(side.index_select(0, sent_samples % num_samples))
                keys.append("alltoall_extra_bytes")
                kind_of.append(1)
        exchange = self._exchange(rows_out, rows_in, kind_of, keys)
        land = _start(exchange, tensors)

        pairs_per_expert = [sum(c[len(columns) - 1 + j] for c in recv_counts) for j in range(m)]
        num_rows, num_pairs = sum(rows_in[0]), sum(pairs_per_expert)

        def arrive() -> tuple[torch.Tensor, list[torch.Tensor], tuple]:
            """Wait for the payload; expand rows into (local expert, row) pairs grouped by expert."""
            landed = land()
            rows, row_gates, bits = landed[0], landed[1], _unpack_bits(landed[2], m)
            pair = _positions(bits.t().reshape(-1), num_pairs)  # expert-major: expert * R + row
            pair_row = pair % max(num_rows, 1)
            pair_gate = row_gates.t().reshape(-1).index_select(0, pair)
            expanded = []
            if sample_inputs:
                # row -> its source rank -> that rank's first sample row + the row's sample slot
                source = torch.repeat_interleave(torch.arange(n, device=x.device), received[:, 0], output_size=num_rows)
                sample_row = _exclusive_cumsum(received[:, 1])[source] + landed[3].long()
                expanded = [side.index_select(0, sample_row.index_select(0, pair_row)) for side in landed[4:]]
            return rows.index_select(0, pair_row), expanded, (pair_row, pair_gate)

        sizes = GroupSizes(num_pairs, m, host=tuple(pairs_per_expert), device=received[:, len(columns) - 1:].sum(0))
        return Routed(sizes, arrive=arrive, state=_RouteState(send_token, rows_out[0], rows_in[0], num_tokens))

    def combine(self, expert_out: torch.Tensor, routed: Routed) -> torch.Tensor:
        s: _RouteState = routed.state
        pair_row, pair_gate = routed.arrived
        weighted = expert_out * pair_gate.unsqueeze(-1).to(expert_out.dtype)
        per_row = expert_out.new_zeros(sum(s.rows_in), expert_out.shape[-1]).index_add(0, pair_row, weighted)
        exchange = self._exchange([s.rows_in], [s.rows_out], [0], ["alltoall_bytes"])
        (back,) = _start(exchange, [per_row])()
        return expert_out.new_zeros(s.num_tokens, expert_out.shape[-1]).index_add(0, s.send_token, back)
