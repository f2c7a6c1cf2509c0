"""Consolidated EMA weights of a run: every expert, as the model's state dict at ep_size 1.

    python -m engine.export --run RUN_DIR [--step N] --out model.safetensors

    cfg, model = load_model_for_inference(run=Path("runs/quickstart"))         # latest checkpoint's EMA
    cfg, model = load_model_for_inference(weights=Path("model.safetensors"))  # an exported file

The exported file holds the EMA of every parameter (experts of all expert-parallel shards stacked
in global expert order) plus the model's persistent buffers (e.g. capacity-predictor thresholds),
and the resolved config as safetensors metadata (`config`, YAML), so plain torch + safetensors
can rebuild the model: no DeepSpeed, no process group.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python engine/export.py`: import from the repository root, not engine/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import safetensors
import safetensors.torch
import torch
import yaml

from engine.config import Config, ConfigError, load_config
from models import DiT, build_model
from parallel.checkpoint import CheckpointError, CheckpointReader, checkpoint_dir, verify_checkpoint
from parallel.checkpoint.files import write_durable

FORMAT = "diffmoe-ema-weights"


def ema_state_dict(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, state dict at ep_size 1): EMA of every parameter, buffers as saved, floats in fp32."""
    manifest = verify_checkpoint(ckpt)
    state = {}
    with CheckpointReader(ckpt, manifest) as reader:
        for name, rec in manifest["tensors"].items():
            key = f"ema/{name}" if rec["ema"] else f"model/{name}"
            value = reader.tensor(key)
            state[name] = value.float() if value.is_floating_point() else value
    return manifest, state


def _inference_config(tree: dict) -> Config:
    """The saved (resolved) config, re-validated, at expert-parallel size 1 (one process holds every expert)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        return load_config(path, ["parallel.ep_size=1"])


def _build(cfg: Config, state: dict[str, torch.Tensor], source: Path) -> DiT:
    model = build_model(cfg)
    expected, got = set(model.state_dict()), set(state)
    if expected != got:
        raise CheckpointError(f"{source} does not match the model of its config: missing "
                              f"{sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_model_for_inference(run: Path | None = None, weights: Path | None = None,
                             step: int | None = None) -> tuple[Config, DiT]:
    """The model (ep_size 1, CPU, eval mode) with EMA weights, from a run's checkpoint (`run`, newest or
    `step`) or an exported file (`weights`), and its config."""
    if (run is None) == (weights is None):
        raise ValueError("load_model_for_inference: give exactly one of run= or weights=")
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise CheckpointError(f"weights file {weights} does not exist")
        try:
            with safetensors.safe_open(str(weights), framework="pt") as f:
                meta = f.metadata() or {}
            state = safetensors.torch.load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types for a malformed file
            raise CheckpointError(f"{weights} is not a valid safetensors file: {e}") from None
        if meta.get("format") != FORMAT or "config" not in meta:
            raise CheckpointError(f"{weights} is not an exported model (no '{FORMAT}' metadata with a config)")
        cfg = _inference_config(yaml.safe_load(meta["config"]))
        return cfg, _build(cfg, state, weights)
    ckpt = checkpoint_dir(Path(run), step)
    manifest, state = ema_state_dict(ckpt)
    cfg = _inference_config(manifest["config"])
    return cfg, _build(cfg, state, ckpt)


def export(run: Path, out: Path, step: int | None = None) -> tuple[Path, int]:
    """Write the consolidated EMA weights of `run` (newest checkpoint or `step`) to `out`;
    returns (checkpoint used, number of parameter values written)."""
    ckpt = checkpoint_dir(run, step)
    manifest, state = ema_state_dict(ckpt)
    cfg = _inference_config(manifest["config"])
    model = _build(cfg, state, ckpt)  # proves the file is complete before it is written
    metadata = {"format": FORMAT, "step": str(manifest["step"]), "checkpoint": str(ckpt),
                "config": yaml.safe_dump(manifest["config"], sort_keys=False)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    write_durable(tmp, safetensors.torch.save(state, metadata=metadata))
    os.replace(tmp, out)
    return ckpt, sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a run's consolidated EMA weights (every expert).")
    parser.add_argument("--run", type=Path, required=True, help="run directory (train.output_dir)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        ckpt, count = export(args.run, args.out, args.step)
    except (CheckpointError, ConfigError) as e:
        print(f"export error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"exported the EMA weights of {ckpt} ({count:,} parameters) to {args.out}")


if __name__ == "__main__":
    main()
