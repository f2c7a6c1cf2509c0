"""What a checkpoint folder holds and which rank writes which piece.

Every saved tensor is addressed as its *global* flattened tensor (expert tensors stacked over all
`model.moe.num_experts`, dim 0 = expert), and every rank writes contiguous element ranges of it:

- trained parameters: the range its ZeRO partition holds (fp32 master `model/`, AdamW `exp_avg/`,
  `exp_avg_sq/`, and the same range of the EMA `ema/`). Dense parameters are partitioned over all
  ranks, expert parameters over their expert-data-parallel group, so expert shards are spread over
  the ranks holding them, and every rank writes about 1/W of the checkpoint;
- untrained tensors (buffers, frozen parameters): whole, each by one rank of its group in turn.

The ranges are recorded per file in the manifest, so any layout can read any range back.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from parallel.checkpoint.files import MANIFEST, CheckpointError
from parallel.checkpoint.zero_state import ZeroOptimizerState
from parallel.groups import create_groups

if TYPE_CHECKING:
    from engine.config import Config

FORMAT = "diffmoe-checkpoint"
VERSION = 2  # v2: one file per rank holding its pieces (v1: consolidated dense and expert files)
RNG_KEY = "rng"  # each rank's RNG states (torch.save bytes, uint8), in its own file
_STEP_DIR = re.compile(r"^step_(\d+)$")

# One piece a rank writes: (key "section/name", 1-D tensor, offset in the global flattened tensor)
Piece = tuple[str, torch.Tensor, int]


class EMALike(Protocol):
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def is_expert(t: torch.Tensor) -> bool:
    return bool(getattr(t, "_is_expert", False))


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers under their state-dict names (the objects themselves)."""
    return model.state_dict(keep_vars=True)


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: which experts it holds, which group shares them."""

    rank: int
    world_size: int
    ep_rank: int
    ep_size: int
    expert_dp_rank: int
    expert_dp_size: int
    num_experts: int

    def block(self, t: torch.Tensor) -> tuple[int, int]:
        """[lo, hi) of this rank's tensor `t` in the global flattened tensor (experts: its EP shard)."""
        lo = self.ep_rank * t.numel() if is_expert(t) else 0
        return lo, lo + t.numel()

    def global_shape(self, t: torch.Tensor) -> list[int]:
        shape = list(t.shape)
        if is_expert(t):
            shape[0] = self.num_experts
        return shape


def layout_of(cfg: Config, tensors: dict[str, torch.Tensor]) -> Layout:
    groups = create_groups(cfg.parallel.ep_size)  # the trainer's groups (created once, returned again)
    layout = Layout(groups.rank, groups.world_size, groups.ep_rank, groups.ep_size, groups.expert_dp_rank,
                    groups.expert_dp_size, cfg.model.moe.num_experts)
    local = layout.num_experts // layout.ep_size
    for name, t in tensors.items():
        if is_expert(t) and (t.dim() == 0 or t.shape[0] != local):
            raise CheckpointError(f"expert tensor '{name}' has shape {tuple(t.shape)}; expected dim 0 = {local} local "
                                  f"experts (model.moe.num_experts={layout.num_experts} / parallel.ep_size="
                                  f"{layout.ep_size})")
    return layout


def tensor_table(tensors: dict[str, torch.Tensor], zero: ZeroOptimizerState, ema_state: dict[str, torch.Tensor],
                 layout: Layout) -> dict[str, Any]:
    """name -> global shape, saved dtype (trained parameters: their fp32 master), expert, trained, has an EMA."""
    unknown = sorted(set(ema_state) - set(tensors))
    if unknown:
        raise CheckpointError(f"EMA tensors {unknown[:5]} are not model tensors")
    return {name: {"shape": layout.global_shape(t),
                   "dtype": str(torch.float32 if zero.manages(t) else t.dtype).removeprefix("torch."),
                   "expert": is_expert(t), "optimizer": zero.manages(t), "ema": name in ema_state}
            for name, t in tensors.items()}


def rank_pieces(tensors: dict[str, torch.Tensor], zero: ZeroOptimizerState, ema_state: dict[str, torch.Tensor],
                layout: Layout) -> list[Piece]:
    """The pieces this rank writes: views of what it holds, nothing gathered or copied."""
    state_keys = zero.tensor_keys()
    pieces: list[Piece] = []
    untrained = 0  # untrained tensors go round-robin over the ranks of their group
    for name, t in tensors.items():
        lo, _ = layout.block(t)
        ema = ema_state.get(name)
        if zero.manages(t):
            fragment = zero.fragment(t)
            if fragment is None:
                continue
            start, length = fragment
            views = [("model", zero.view(t, None)), *((key, zero.view(t, key)) for key in state_keys)]
            if ema is not None:
                views.append(("ema", ema.reshape(-1).narrow(0, start, length)))
            pieces += [(f"{section}/{name}", view, lo + start) for section, view in views]
            continue
        group_rank, group_size = ((layout.expert_dp_rank, layout.expert_dp_size) if is_expert(t)
                                  else (layout.rank, layout.world_size))
        if untrained % group_size == group_rank:
            pieces.append((f"model/{name}", t.detach().reshape(-1), lo))
            if ema is not None:
                pieces.append((f"ema/{name}", ema.reshape(-1), lo))
        untrained += 1
    return pieces


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint folder `path`; errors name the folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint: no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / MANIFEST} is unreadable: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path / MANIFEST}: not a {FORMAT} v{VERSION} manifest "
                              f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    return manifest


def complete_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST).is_file())
