"""Inception-v3 of the TensorFlow FID graph (inception-2015-12-05) in plain torch, for evaluation.

This is the network behind FID, sFID, Inception Score and precision/recall in the ADM evaluator
(guided-diffusion), pytorch-fid and torch-fidelity. Weights are read from a local file, never
downloaded: `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid release) — the same file as
torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`. Layer names follow that file.

It differs from torchvision's Inception-v3 where the TF graph does: 1008 output classes, average
pools that ignore padding, a max pool in the last block's pool branch, TF1 bilinear resizing to
299x299 and (x - 128) / 128 input scaling. Features of one image batch:

    pool     [B, 2048]   global average pool (TF `pool_3`): FID, precision/recall
    spatial  [B, 2023]   first 7 channels of Mixed_6d's 1x1 branch on the 17x17 grid (TF
                         `mixed_6/conv`), flattened in NHWC order: sFID
    logits   [B, 1008]   pool @ fc.weight.T without bias (ADM's and torch-fidelity's IS logits)
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]


class FeatureExtractor(Protocol):
    """What the evaluator needs: uint8 [B, H, W, C] images -> dict of float [B, D] features with
    key `pool` (required), `spatial` and `logits` (optional: sFID / IS are skipped without them)."""

    name: str

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, the TF graph's) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that, like TF, averages over the in-image pixels only."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b..5d)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),  # first: channels 0..191 of the output are TF's mixed_N/conv
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(b7)),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 heads (Mixed_7b, and Mixed_7c whose pool branch max-pools
    in the TF graph)."""

    def __init__(self, cin: int, max_pool_branch: bool):
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool_branch else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `resize_bilinear` (align_corners=False, no half-pixel centres) of [B, C, H, W] to
    size x size: output pixel i samples the input at i * in / out. The TF graph resizes this way;
    torch's `interpolate` uses half-pixel centres and would shift every feature slightly."""

    def axis_weights(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    h_lo, h_hi, h_w = axis_weights(x.shape[2])
    w_lo, w_hi, w_w = axis_weights(x.shape[3])
    rows = x[:, :, h_lo] + (x[:, :, h_hi] - x[:, :, h_lo]) * h_w[:, None]
    return rows[..., w_lo] + (rows[..., w_hi] - rows[..., w_lo]) * w_w


class InceptionV3(nn.Module):
    """The FID Inception network; `forward(uint8 [B, H, W, C])` -> {pool, spatial, logits}."""

    name = "inception-2015-12-05"

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)
        self.fc = nn.Linear(2048, 1008)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"Inception expects uint8 [B, H, W, 1 or 3] images, got {images.dtype} {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1)
        x = resize_bilinear_tf1(x, INPUT_SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = x.mean(dim=(2, 3))
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.T}


def _check_digest(path: Path) -> None:
    """Files named like torch hub's `name-<first 8 hex of sha256>.pth` are checked against it."""
    match = re.search(r"-([0-9a-f]{8})\.pth$", path.name)
    if not match:
        return
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    if not sha.hexdigest().startswith(match.group(1)):
        raise ValueError(f"{path}: SHA-256 {sha.hexdigest()[:8]}... does not match the {match.group(1)} in its name "
                         "(incomplete or corrupted download)")


def default_weights_locations() -> list[Path]:
    """Where a previous pytorch-fid / torch-fidelity install may have put the weights."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return [hub / name for name in WEIGHTS_FILENAMES]


def load_inception(path: str | Path | None = None, device: torch.device | str = "cpu") -> InceptionV3:
    """The FID Inception with weights from `path` (else the torch hub cache of pytorch-fid or
    torch-fidelity); a missing file or a mismatching state dict is an error naming the file."""
    if path is None:
        found = [p for p in default_weights_locations() if p.is_file()]
        if not found:
            raise FileNotFoundError(
                "no Inception weights: pass --inception PATH to pt_inception-2015-12-05-6726825d.pth "
                f"(see docs/evaluation.md); also looked in {', '.join(map(str, default_weights_locations()))}")
        path = found[0]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path}")
    _check_digest(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = InceptionV3()
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: not the FID Inception state dict (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                         f"expected {WEIGHTS_FILENAMES[0]}")
    for key, value in model.state_dict().items():
        if key in state and state[key].shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False).to(device)
