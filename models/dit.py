"""Diffusion Transformer (DiT, Peebles & Xie) with adaLN-Zero blocks and a pluggable FFN slot.

    x [B, C, H, W] --patchify--> tokens [B, N, d] (+ fixed 2D sin-cos positions, or 2D RoPE inside
    attention) --depth x DiTBlock(c = t_emb + y_emb)--> final adaLN layer --unpatchify--> [B, C_out, H, W]

The FFN of block i is `models.ffn.build_ffn(cfg, i, ep_rank, ep_size)`: the dense MLP or an MoE
layer, called as `ffn(x, c, t)`. t in [0, 1] with 0 = noise and 1 = data, for every objective.

Text-to-image (`model.text.encoder` set, docs/t2i.md): the class embedding is replaced by the
projected pooled text vector (c = t_emb + pooled_emb), and every block gains a cross-attention from
its image tokens to the projected token states of the caption, between self-attention and FFN.
The FFN slot still sees only (x, c, t), so every MoE routing and expert parallelism are unchanged.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import Attention, CrossAttention, RopeTables, rope_2d_tables
from models.embeddings import LabelEmbedder, PatchEmbed, TextProjection, TimestepEmbedder, sincos_2d
from models.ffn import DenseFFN, build_ffn, is_moe_block
from models.moe.spatial import DepthwiseTokenConv
from models.text import TextEmbeddings, text_width

if TYPE_CHECKING:
    from engine.config import ModelConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, N, d] * (1 + scale [B, d]) + shift [B, d]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """adaLN-Zero block: shift/scale/gate for attention and for the FFN slot, all from c.

    Text-conditioned blocks add `x += CrossAttn(LN(x), context)` after self-attention (PixArt-alpha
    style: not modulated by c; its output projection starts at zero, so the block starts as the identity).
    """

    def __init__(self, cfg: ModelConfig, block_index: int, ep_rank: int, ep_size: int):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, kernel=cfg.attention)
        if cfg.text.encoder != "none":
            self.norm_cross = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
            self.cross_attn = CrossAttention(d, cfg.num_heads, kernel=cfg.attention)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ffn = build_ffn(cfg, block_index, ep_rank, ep_size)
        # Diff-MoE: a depthwise conv over the token grid feeds the MoE slot (before norm2, as the
        # reference block); the residual adds the FFN output to the un-convolved stream
        kernel = cfg.moe.spatial_conv_kernel if is_moe_block(cfg, block_index) else 0
        self.spatial = DepthwiseTokenConv(d, kernel, block_index) if kernel else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor, rope: RopeTables | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        h = x if self.spatial is None else self.spatial(x)
        x = x + gate_ffn.unsqueeze(1) * self.ffn(modulate(self.norm2(h), shift_ffn, scale_ffn), c, t)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map of each token to its p*p*C_out patch values."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class- or text-conditional DiT. `ep_rank`/`ep_size` tell MoE slots which experts this rank holds."""

    def __init__(self, cfg: ModelConfig, ep_rank: int = 0, ep_size: int = 1):
        super().__init__()
        self.cfg = cfg
        self.in_channels = cfg.in_channels
        self.out_channels = 2 * cfg.in_channels if cfg.learn_sigma else cfg.in_channels
        self.learn_sigma = cfg.learn_sigma
        self.patch_size = cfg.patch_size
        self.input_size = cfg.input_size
        self.grid_size = cfg.input_size // cfg.patch_size
        self.num_tokens = self.grid_size**2
        self.use_rope = cfg.position == "rope"
        self.grad_checkpointing = cfg.grad_checkpointing
        self.text_conditioned = cfg.text.encoder != "none"
        d = cfg.hidden_size

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d, time_scale=cfg.time_scale, time_offset=cfg.time_offset)
        # expert choice and DiffMoE choose tokens from a pool, so what shares a forward changes routing
        self.pools_tokens = cfg.moe.routing in ("expert_choice", "diffmoe")
        if self.text_conditioned:
            self.text_embedder = TextProjection(text_width(cfg.text), d)
        else:
            self.y_embedder = LabelEmbedder(cfg.num_classes, d)
        if not self.use_rope:
            # fixed, not trained; a Parameter (as in DiT) so it counts in the published sizes
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, d), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(cfg, i, ep_rank, ep_size) for i in range(cfg.depth))
        self.final_layer = FinalLayer(d, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (dropped) class (text-conditioned models ignore labels)."""
        return self.cfg.num_classes

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, zero biases, N(0, 0.02) embeddings, zero adaLN and output.

        MoE slots initialise themselves (experts from per-expert generators), so they are skipped
        here: the global RNG stream consumed below does not depend on ep_rank / ep_size.
        """
        def xavier(module: nn.Module) -> None:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

        for block in self.blocks:
            xavier(block.attn)
            xavier(block.adaLN_modulation)
            if isinstance(block.ffn, DenseFFN):
                xavier(block.ffn)
            if block.cross_attn is not None:
                xavier(block.cross_attn)
                nn.init.zeros_(block.cross_attn.proj.weight)  # starts as the identity, like adaLN-Zero
        xavier(self.final_layer)
        if not self.use_rope:
            with torch.no_grad():
                self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], self.grid_size).float().unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.text_conditioned:
            for mlp in (self.text_embedder.token_mlp, self.text_embedder.pooled_mlp):
                for layer in (mlp[0], mlp[2]):
                    nn.init.normal_(layer.weight, std=0.02)
                    nn.init.zeros_(layer.bias)
        else:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the model output starts at exactly 0
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C_out] -> [B, C_out, H, W]."""
        b, p, c, g = x.shape[0], self.patch_size, self.out_channels, self.grid_size
        x = x.reshape(b, g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                text: TextEmbeddings | None = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] in [0, 1] (0 noise, 1 data); class-conditional models take y [B]
        labels (null_class allowed), text-conditioned ones `text` (batch B) and ignore y."""
        expected = (self.in_channels, self.input_size, self.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"DiT input has shape {tuple(x.shape)}, expected [B, {', '.join(map(str, expected))}] "
                             "(model.in_channels, model.input_size)")
        h = self.x_embedder(x)
        if not self.use_rope:
            h = h + self.pos_embed
        context = context_mask = None
        if self.text_conditioned:
            if text is None:
                raise ValueError(f"this DiT is text-conditioned (model.text.encoder={self.cfg.text.encoder}): pass text=")
            context, pooled = self.text_embedder(text.tokens, text.pooled)
            context_mask = text.mask
            c = self.t_embedder(t) + pooled
        else:
            if y is None or text is not None:
                raise ValueError("this DiT is class-conditional: pass labels y (set model.text.encoder for text)")
            c = self.t_embedder(t) + self.y_embedder(y)
        rope = rope_2d_tables(self.grid_size, self.grid_size, self.blocks[0].attn.head_dim, h.device) if self.use_rope else None
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, t, rope, context, context_mask, use_reentrant=False)
            else:
                h = block(h, c, t, rope, context, context_mask)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, cfg_scale: float,
                         text: TextEmbeddings | None = None, null_text: TextEmbeddings | None = None,
                         guided_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance: the first `guided_channels` channels (None: all C input channels;
        DiT's DDPM convention guides 3) become v_u + s (v_c - v_u); the other channels, learned sigma
        included, come from the conditional output.

        Unconditional is the null class, or for text-conditioned models `null_text`, the empty
        prompt's embedding (batch 1 or B). With `model.moe.cfg_pool=separate` and a routing that
        pools tokens, the two halves run as two forwards, each its own token pool (the DiffMoE flow
        sampler); otherwise one batched forward over [conditional; unconditional] (a joint pool).
        """
        if self.text_conditioned:
            if text is None or null_text is None:
                raise ValueError("guidance of a text-conditioned DiT needs text= and null_text= (the empty prompt)")
            halves = [dict(y=None, text=text), dict(y=None, text=null_text.expand_to(len(text)))]
        else:
            halves = [dict(y=y), dict(y=torch.full_like(y, self.null_class))]
        if self.pools_tokens and self.cfg.moe.cfg_pool == "separate":
            cond, uncond = (self(x, t, **half) for half in halves)
        else:
            joint_text = TextEmbeddings.cat([h["text"] for h in halves]) if self.text_conditioned else None
            joint_y = None if self.text_conditioned else torch.cat([h["y"] for h in halves])
            cond, uncond = self(torch.cat([x, x]), torch.cat([t, t]), joint_y, text=joint_text).chunk(2, dim=0)
        c = self.in_channels if guided_channels is None else min(guided_channels, self.in_channels)
        guided = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1)

    def flops_per_sample(self) -> float:
        """Forward FLOPs (2 * MACs) of one sample: every linear map and attention's Q K^T and A V.

        The FFN slot counts `ffn.activated_params()` MACs per token (the average for MoE layers).
        Norms, activations, softmax and biases are not counted.
        """
        n, d = self.num_tokens, self.cfg.hidden_size
        p2 = self.patch_size**2
        macs = n * self.in_channels * p2 * d  # patch embedding
        macs += self.t_embedder.frequency_dim * d + d * d  # timestep MLP (once per sample)
        for block in self.blocks:
            macs += d * 6 * d  # adaLN modulation (once per sample)
            macs += n * block.ffn.activated_params()
            if block.spatial is not None:  # depthwise conv: one MAC per weight per token
                macs += n * block.spatial.conv.weight.numel()
        flops = 2.0 * macs + sum(block.attn.flops_per_sample(n) for block in self.blocks)
        if self.text_conditioned:  # caption padded to model.text.max_length tokens
            length = self.cfg.text.max_length
            flops += self.text_embedder.flops_per_sample(length)
            flops += sum(block.cross_attn.flops_per_sample(n, length) for block in self.blocks)
        flops += 2.0 * (d * 2 * d + n * d * p2 * self.out_channels)  # final adaLN + output linear
        return flops


def compile_model(model: DiT) -> DiT:
    """torch.compile every block in place (parameter names unchanged, so checkpoints, EMA and
    DeepSpeed see the plain module). Per block, so graph breaks in MoE routing stay local."""
    for block in model.blocks:
        block.compile()
    return model
