"""The MoE layer filling a DiT block's FFN slot: router -> pool selection -> dispatch -> experts -> combine.

    layer(x [B, N, d], c [B, d], t [B]) -> [B, N, d]

Routing strategies (`model.moe.routing`):
- `token_choice` (TC-DiT, Diff-MoE, the recipe): each token picks its top-k experts; with
  `drop_tokens` each expert keeps at most int(capacity * pool_tokens * k / E) of them (the
  highest-affinity ones of each pool); balance by the auxiliary loss and/or the sigmoid_bias router.
- `expert_choice` (EC-DiT, pool=sample) and `diffmoe` (pool=micro_batch or a cross-rank pool): each
  expert takes its top k = int(pool_tokens / E * capacity) tokens by softmax score; a token is
  taken by 0..E experts and its output is the score-weighted sum. DiffMoE adds the capacity
  predictor (BCE against the selection, per-expert threshold EMA) and dynamic inference.
The layer holds only this EP rank's experts. `pool` and `dispatcher` are replaced by
`parallel.expert_parallel` for cross-rank pools and all-to-all dispatch; every selection goes
through them, so the code path is the same at EP=1 and EP=N.

After each forward: `aux_loss` (weighted TC balance loss + predictor BCE, 0 when none) and `stats`
(detached tensors, keys without the `moe/layer{i}/` prefix that `collect_stats` adds).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from models.moe import selection
from models.moe.dispatcher import LocalDispatcher, RoutingPlan
from models.moe.experts import ExpertBank
from models.moe.losses import load_balance_loss, predictor_loss
from models.moe.pool import LocalPool, TokenPool
from models.moe.predictor import CapacityPredictor
from models.moe.router import Router
from models.moe.shared import SharedExperts
from models.moe.spatial import ChannelRecalibration

if TYPE_CHECKING:
    from engine.config import ModelConfig

TIME_BUCKETS = 10  # timestep buckets of the load / compute monitors (t in [0, 1], 0 = noise)


def _recomputing() -> bool:
    """True while activation checkpointing re-runs the forward inside backward: the layer's side
    effects (threshold EMA, bias load counts, meters) must happen once per real forward."""
    return torch._C._current_graph_task_id() != -1


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, block_index: int, ep_rank: int = 0, ep_size: int = 1):
        super().__init__()
        moe = cfg.moe
        if moe.routing not in ("token_choice", "expert_choice", "diffmoe"):
            raise ValueError(f"model.moe.routing: MoELayer does not build routing {moe.routing!r}")
        if moe.num_experts % ep_size or not 0 <= ep_rank < ep_size:
            raise ValueError(f"parallel.ep_size: {ep_size} (rank {ep_rank}) does not split model.moe.num_experts={moe.num_experts}")
        d = cfg.hidden_size
        self.block_index = block_index
        self.routing = moe.routing
        self.num_experts = moe.num_experts
        self.num_local_experts = moe.num_experts // ep_size
        self.expert_hidden = moe.expert_hidden or int(cfg.mlp_ratio * d)
        self.top_k = moe.top_k
        self.normalize_weights = moe.normalize_weights or moe.router == "sigmoid_bias"
        self.routed_scaling = moe.routed_scaling
        self.target_capacity = moe.capacity
        self.capacity = moe.capacity  # current value (the capacity schedule changes it, see set_step)
        self.schedule = (moe.capacity_schedule_stage1, moe.capacity_schedule_stage2)
        self.drop_tokens = moe.drop_tokens
        self.aux_loss_weight = moe.aux_loss_weight
        self.predictor_loss_weight = moe.predictor_loss_weight
        self.threshold_ema = moe.threshold_ema
        self.bias_update_rate = moe.bias_update_rate
        self.inference = moe.inference
        self.threshold_shift = moe.threshold_shift

        self.router = Router(d, moe.num_experts, moe.router, block_index, scheme=moe.router_init,
                             init_std=moe.router_init_std, routing=moe.routing)
        self.experts = ExpertBank(self.num_local_experts, d, self.expert_hidden, moe.activation, block_index=block_index,
                                  name="expert", first_expert=ep_rank * self.num_local_experts,
                                  time_aware=moe.time_aware, time_rank=moe.time_rank, adaln_init=moe.expert_adaln_init)
        for p in self.experts.parameters():
            p._is_expert = True
        shared_hidden = moe.num_shared_experts * (moe.shared_expert_hidden or self.expert_hidden)
        self.shared = SharedExperts(d, shared_hidden, moe.activation, block_index=block_index, time_aware=moe.time_aware,
                                    time_rank=moe.time_rank, adaln_init=moe.expert_adaln_init) if moe.num_shared_experts else None
        self.recalibration = ChannelRecalibration(d, self.expert_hidden, moe.time_rank, block_index) if moe.recalibration else None
        use_predictor = moe.predictor and moe.routing in ("expert_choice", "diffmoe")
        self.predictor = CapacityPredictor(d, moe.num_experts, block_index) if use_predictor else None

        # Cross-rank scopes are installed by parallel.expert_parallel; alone, a process is its own pool.
        self.pool: TokenPool = LocalPool(moe.pool if moe.pool in ("sample", "micro_batch") else "micro_batch")
        self.dispatcher = LocalDispatcher()
        self.aux_loss = torch.zeros(())
        self._stats_inputs: tuple | None = None  # what the last forward saw; `stats` is built on demand
        self._stats_cache: dict[str, torch.Tensor] | None = None
        self.reset_meter()

    # ---------------------------------------------------------------------------------- control
    def set_step(self, step: int) -> None:
        """Capacity schedule (reference DiffMoE): E until stage I, linear decay to target by stage II."""
        stage1, stage2 = self.schedule
        if stage2 <= 0 or step > stage2:
            self.capacity = self.target_capacity
        elif step <= stage1:
            self.capacity = float(self.num_experts)
        else:
            frac = (stage2 - step) / (stage2 - stage1)
            self.capacity = self.target_capacity + (self.num_experts - self.target_capacity) * frac

    def reset_meter(self) -> None:
        """Zero the counters behind `measured_activated_params` (the sampler does it per run)."""
        self.meter_pairs: int | torch.Tensor = 0  # a device tensor once a forward has run
        self.meter_tokens = 0

    def _experts_per_token(self) -> float:
        return float(self.top_k) if self.routing == "token_choice" else float(self.target_capacity)

    def _always_on_params(self) -> int:
        """Parameters every token uses besides its routed experts (router, shared, recalibration)."""
        parts = [self.router, self.shared, self.recalibration]
        return sum(p.numel() for m in parts if m is not None for p in m.parameters())

    def activated_params(self) -> float:
        """Nominal parameters applied per token (routed experts at top-k / capacity; predictor excluded)."""
        return self._experts_per_token() * self.experts.params_per_expert() + self._always_on_params()

    def measured_activated_params(self) -> float:
        """Parameters applied per token, averaged over the tokens seen since `reset_meter`."""
        per_token = float(self.meter_pairs) / self.meter_tokens if self.meter_tokens else self._experts_per_token()
        return per_token * self.experts.params_per_expert() + self._always_on_params()

    # ---------------------------------------------------------------------------------- forward
    def _select(self, flat: torch.Tensor, affinity: torch.Tensor, select_score: torch.Tensor, tokens_per_sample: int,
                record: bool) -> tuple[RoutingPlan, torch.Tensor, dict[str, torch.Tensor]]:
        """-> (routing plan, weighted aux loss, raw inputs of stats)."""
        num_tokens = flat.shape[0]
        pool_tokens = self.pool.pool_tokens(num_tokens, tokens_per_sample)
        aux = affinity.new_zeros(())
        stats: dict[str, torch.Tensor] = {}
        if self.routing == "token_choice":
            chosen, choices = selection.top_k_choice(select_score.detach(), self.top_k)
            weights = selection.token_choice_weights(affinity, chosen, self.normalize_weights, self.routed_scaling)
            if self.drop_tokens and self.training:
                cap = selection.token_choice_capacity(pool_tokens, self.num_experts, self.top_k, self.capacity)
                selected = selection.drop_over_capacity(chosen, affinity.detach(), self.pool, cap, tokens_per_sample)
                plan = RoutingPlan(selected, weights, tokens_per_sample)
            else:
                plan = RoutingPlan(chosen, weights, tokens_per_sample, token_experts=choices)
            if self.training and self.aux_loss_weight > 0:
                counts = self.pool.pool_sum(chosen.sum(0).to(affinity.dtype))
                aux = aux + self.aux_loss_weight * load_balance_loss(self.router.probabilities(affinity), counts)
            if self.router.kind == "sigmoid_bias" and record:
                self.router.load.add_(chosen.sum(0).to(self.router.load.dtype))
            stats["chosen"] = chosen
            return plan, aux, stats

        weights = affinity * self.routed_scaling if self.routed_scaling != 1.0 else affinity
        pred = self.predictor(flat) if self.predictor is not None else None
        prob = None if pred is None else pred.detach().float().sigmoid()
        k = selection.expert_choice_k(pool_tokens, self.num_experts, self.capacity)
        if not self.training and self.inference == "dynamic":
            if pred is None:
                raise ValueError("dynamic inference needs the capacity predictor (model.moe.predictor=true)")
            eligible = prob > (self.predictor.threshold + self.threshold_shift)
            group = tokens_per_sample if self.pool.scope == "sample" else num_tokens
            plan = RoutingPlan(selection.dynamic_choice(affinity.detach(), eligible, group), weights, tokens_per_sample)
            kth = None
        else:
            # The predictor's threshold target (the k-th largest predicted probability of each pool)
            # rides along the same selection: one set of collectives for both in a cross-rank pool.
            wants_kth = prob is not None and self.training and record
            chosen = self.pool.select(affinity.detach(), k, tokens_per_sample, kth_of=prob if wants_kth else None,
                                      finite=True)
            plan = RoutingPlan(chosen.mask, weights, tokens_per_sample, expert_tokens=chosen.index, checks=chosen.checks)
            kth = chosen.kth
        if pred is not None:
            if self.training:
                aux = aux + self.predictor_loss_weight * predictor_loss(pred, plan.mask)
                if kth is not None:
                    self.predictor.update_threshold(kth, self.threshold_ema)
            stats["predicted"] = prob
            stats["threshold"] = self.predictor.threshold.clone()
        return plan, aux, stats

    def forward(self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        dtype = x.dtype
        record = self.training and not _recomputing()
        flat = x.reshape(b * n, d)
        affinity, select_score = self.router(flat)
        plan, aux, stats = self._select(flat, affinity, select_score, n, record)

        # Side inputs constant over a sample travel per sample; the dispatcher expands them to rows.
        sample_inputs = []
        if self.experts.time_aware:
            sample_inputs.append(c)
        if self.recalibration is not None:
            sample_inputs.append(x.mean(1))
        routed = self.dispatcher.dispatch(plan, flat, tuple(sample_inputs))
        # Work that does not wait for routed tokens runs while an all-to-all dispatch is in flight.
        shared_out = None
        if self.shared is not None:
            cond = c.unsqueeze(1).expand(b, n, d).reshape(b * n, d) if self.shared.ffn.time_aware else None
            shared_out = self.shared(flat, cond)
        routed_cond = routed.sample_inputs[0] if self.experts.time_aware else None
        channel_weights = self.recalibration(routed.sample_inputs[-1]) if self.recalibration is not None else None
        expert_out = self.experts(routed.tokens, routed.sizes, routed_cond, channel_weights)
        out = self.dispatcher.combine(expert_out, routed)
        if shared_out is not None:
            out = out + shared_out

        self.aux_loss = aux
        if not _recomputing():
            self.meter_pairs = self.meter_pairs + plan.mask.sum()  # stays on the device until read
            self.meter_tokens += b * n
            self._stats_inputs = (affinity.detach(), plan.mask, None if t is None else t.detach(), n, self.capacity, stats)
            self._stats_cache = None
        return out.reshape(b, n, d).to(dtype)

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """Monitors of the last forward (detached), computed when first read (training steps that
        are not logged pay nothing): tokens_per_expert [E], experts_per_token, router_entropy,
        capacity, dropped_frac (TC) or unrouted_frac (EC / DiffMoE), predictor_acc and threshold [E]
        (predictor), router_bias [E] (sigmoid_bias), load_by_t [E, TIME_BUCKETS] (share of a
        timestep bucket's tokens each expert took) and compute_by_t [TIME_BUCKETS] (experts per token)."""
        if self._stats_cache is None:
            self._stats_cache = {} if self._stats_inputs is None else self._compute_stats(*self._stats_inputs)
        return self._stats_cache

    @torch.no_grad()
    def _compute_stats(self, affinity: torch.Tensor, selected: torch.Tensor, t: torch.Tensor | None,
                       tokens_per_sample: int, capacity: float, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        probs = self.router.probabilities(affinity)
        sel = selected.float()
        stats: dict[str, torch.Tensor] = {}
        if "chosen" in raw:
            stats["dropped_frac"] = 1.0 - sel.sum() / raw["chosen"].sum().clamp_min(1)
        if "predicted" in raw:
            stats["predictor_acc"] = ((raw["predicted"] > raw["threshold"]) == selected).float().mean()
            stats["threshold"] = raw["threshold"]
        stats["tokens_per_expert"] = sel.sum(0)
        stats["experts_per_token"] = sel.sum() / max(1, sel.shape[0])
        stats["router_entropy"] = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
        stats["capacity"] = torch.tensor(float(capacity))
        if self.routing != "token_choice":
            stats["unrouted_frac"] = (sel.sum(1) == 0).float().mean()
        if self.router.kind == "sigmoid_bias":
            stats["router_bias"] = self.router.balance_bias.detach().clone()
        if t is not None:
            bucket = (t.float() * TIME_BUCKETS).long().clamp_(0, TIME_BUCKETS - 1)
            bucket = bucket.repeat_interleave(tokens_per_sample)
            per_bucket = sel.new_zeros(TIME_BUCKETS).index_add_(0, bucket, sel.new_ones(bucket.shape)).clamp_min(1)
            load = sel.new_zeros(self.num_experts, TIME_BUCKETS).index_add_(1, bucket, sel.t())
            stats["load_by_t"] = load / per_bucket  # [E, buckets]: share of a bucket's tokens each expert took
            stats["compute_by_t"] = load.sum(0) / per_bucket  # experts applied per token, by bucket
        return stats
