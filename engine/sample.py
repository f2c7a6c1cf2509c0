"""Sample a trained model over any number of ranks: PNGs, a grid and an ADM-evaluator `.npz`.

    python engine/sample.py --run runs/diffmoe_l_e16_flow --num-samples 50000 --cfg-scale 1.5
    torchrun --nproc-per-node 8 engine/sample.py --weights model.safetensors --inference dynamic --threshold-shift 0.05

Sample i has label `classes[i % len(classes)]` (default: every class in turn) and its own noise
(seed derived from (--seed, i)). Global batches of --batch-size consecutive indices are dealt to
the ranks round-robin, so every image — static DiffMoE inference pools tokens over its batch —
is the same whatever the number of ranks. The output folder holds `images/NNNNNN.png`,
`grid.png`, `samples_NxHxWxC.npz` (uint8 NHWC `arr_0`, labels `arr_1`; the input of
engine/evaluate.py and of ADM's evaluator), `settings.json` and `summary.json`. Re-running the
same command after an interruption keeps the finished batches. The last stdout line is JSON.

Text-conditioned models sample from `--prompts FILE` (one prompt per line, docs/t2i.md): sample i
gets prompt i mod P, `grid.png` has one column per prompt, the `.npz` labels are prompt numbers,
and with --run the grid is also added to the run's TensorBoard (`samples/prompts`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python engine/sample.py`: import from the repository root, not engine/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from engine.config import Config, ConfigError, validate
from engine.data.shards import DataError
from engine.export import load_model_for_inference
from engine.npz_io import NpzWriter
from engine.params import count_params
from engine.rng import sample_seed
from engine.sampling import generate, save_grid
from engine.text_conditioning import (SAMPLES_PER_PROMPT, TextConditioner, build_text_conditioner, log_prompt_grid,
                                      prompts_for, prompts_of)
from models import DiT, moe
from models.diffusion import Objective, build_diffusion
from parallel.checkpoint import CheckpointError
from parallel.zero import DistContext, init_distributed, run_then_exit

GRID_IMAGES = 64  # the first images of the run, in index order


class SampleError(ValueError):
    """Bad sampling request or output folder; the message names the option or file."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample a trained DiT / DiffMoE model (see the module docstring).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="run directory: EMA weights of its latest (or --step) checkpoint")
    source.add_argument("--weights", type=Path, help="exported model.safetensors (python -m engine.export)")
    p.add_argument("--step", type=int, help="checkpoint step of --run (default: the latest)")
    p.add_argument("--num-samples", type=int, help="images to generate (default: eval.num_samples of the config)")
    p.add_argument("--classes", help="comma-separated class ids cycled over the samples (default: all classes)")
    p.add_argument("--prompts", type=Path, help="text-conditioned models: a file of prompts, one per line, cycled over "
                                                "the samples (grid: one column per prompt; default 8 samples each)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default: diffusion.cfg_scale)")
    p.add_argument("--sampler", help="euler/heun (flow) or ddpm/ddim (DDPM) (default: diffusion.sampler)")
    p.add_argument("--steps", type=int, help="sampling steps (default: diffusion.sample_steps)")
    p.add_argument("--inference", choices=["static", "dynamic"], help="DiffMoE inference (default: model.moe.inference)")
    p.add_argument("--threshold-shift", type=float,
                   help="dynamic inference: added to the predictor thresholds, > 0 less compute (default: model.moe.threshold_shift)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass and rank (the static MoE pool)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="model dtype (the sampler integrates in fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output folder (default: under the run / next to the weights)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.step is not None and args.run is None:
        p.error("--step selects a checkpoint of --run")
    for name in ("num_samples", "steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


# --------------------------------------------------------------------------------------------
# What each sample index gets, and which rank makes it
# --------------------------------------------------------------------------------------------


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    if text is None:
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise SampleError(f"--classes: expected comma-separated integers, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise SampleError(f"--classes: ids must be in 0..{num_classes - 1} (model.num_classes), got {text!r}")
    return classes


def labels_of(indices: range, classes: list[int]) -> torch.Tensor:
    return torch.tensor([classes[i % len(classes)] for i in indices], dtype=torch.long)


def seeds_of(indices: range, seed: int) -> list[int]:
    """One noise seed per global sample index (independent of batch and rank)."""
    return [sample_seed(seed, 0, i, "sample") for i in indices]


def rank_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """Global batch j = indices [j*B, (j+1)*B) goes to rank j mod world_size."""
    starts = range(rank * batch_size, num_samples, world_size * batch_size)
    return [range(s, min(s + batch_size, num_samples)) for s in starts]


# --------------------------------------------------------------------------------------------
# Model output -> images
# --------------------------------------------------------------------------------------------


class Decoder:
    """Model samples -> uint8 [B, H, W, C]: pixels in [-1, 1] directly, latents through the
    config's local diffusers AutoencoderKL (`data.vae`)."""

    def __init__(self, cfg: Config, device: torch.device):
        self.vae = None
        if cfg.data.latent:
            if not cfg.data.vae:
                raise SampleError("data.vae: the model samples latents; set it to a local AutoencoderKL folder")
            from engine.data.vae import LatentEncoder, latent_meta

            image_size = cfg.model.input_size * latent_meta(cfg.data.vae, 0)["downsample"]
            self.vae = LatentEncoder(cfg.data.vae, image_size, device)
            if self.vae.meta["channels"] != cfg.model.in_channels:
                raise SampleError(f"data.vae: {cfg.data.vae} has {self.vae.meta['channels']} latent channels, "
                                  f"the model {cfg.model.in_channels}")

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor) -> np.ndarray:
        if self.vae is not None:
            samples = self.vae.decode(samples)
        pixels = ((samples.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()


def write_png(path: Path, image: np.ndarray) -> None:
    """Atomic: a PNG that exists is complete (an interrupted run resumes from the finished ones)."""
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG")
    os.replace(tmp, path)


def read_png(path: Path) -> np.ndarray:
    image = np.array(Image.open(path))
    return image[..., None] if image.ndim == 2 else image


# --------------------------------------------------------------------------------------------
# Settings, resume, output
# --------------------------------------------------------------------------------------------


def weights_fingerprint(model: DiT) -> str:
    """Cheap identity of the weights (a new checkpoint in the run must not mix with old images)."""
    total = sum(float(p.detach().double().sum()) + float(p.detach().double().square().sum())
                for p in model.state_dict().values() if p.is_floating_point())
    return f"{total:.12e}"


def default_out(args: argparse.Namespace, settings: dict, name: str) -> Path:
    shift = f"{settings['threshold_shift']:+g}" if settings["inference"] == "dynamic" else ""
    tag = (f"{name}-{'step' + str(args.step) if args.step is not None else 'latest'}-n{settings['num_samples']}"
           f"-cfg{settings['cfg_scale']:g}-{settings['sampler']}{settings['steps']}-{settings['inference']}{shift}"
           f"-seed{settings['seed']}")
    if args.run is not None:
        return args.run / "samples" / tag
    return args.weights.parent / f"{args.weights.stem}_samples" / tag


def check_settings(out: Path, settings: dict) -> None:
    """An existing output folder must hold samples of the same request (then it resumes)."""
    path = out / "settings.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    differ = [f"{k} {old.get(k)!r} vs {v!r}" for k, v in settings.items() if old.get(k) != v]
    if differ:
        raise SampleError(f"{out} holds samples of other settings ({'; '.join(differ)}): choose another --out "
                          "or delete the folder")


def resolve_settings(args: argparse.Namespace, cfg: Config, model: DiT) -> dict:
    """Command-line values over the config's defaults, validated through the config's own rules."""
    cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion))
    if args.sampler is not None:
        cfg.diffusion.sampler = args.sampler
    try:
        validate(cfg)
    except ConfigError as e:
        raise SampleError(f"--sampler: {e}") from None
    has_moe = any(True for _ in moe.moe_layers(model))
    inference = (args.inference or cfg.model.moe.inference) if has_moe else "dense"
    return {
        "source": str(args.run if args.run is not None else args.weights),
        "step": args.step,
        "weights": weights_fingerprint(model),
        "num_samples": args.num_samples or cfg.eval.num_samples,
        "classes": args.classes or "all",
        "cfg_scale": cfg.diffusion.cfg_scale if args.cfg_scale is None else args.cfg_scale,
        "sampler": cfg.diffusion.sampler,
        "steps": args.steps or cfg.diffusion.sample_steps,
        "inference": inference,
        "threshold_shift": (cfg.model.moe.threshold_shift if args.threshold_shift is None else args.threshold_shift)
        if inference == "dynamic" else None,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "seed": args.seed,
    }


def write_npz(out: Path, num_samples: int, labels: torch.Tensor, progress: bool) -> Path:
    """Stream the PNGs, in index order, into the ADM-evaluator batch."""
    first = read_png(out / "images" / f"{0:06d}.png")
    path = out / f"samples_{num_samples}x{'x'.join(map(str, first.shape))}.npz"
    with NpzWriter(path) as npz:
        images = npz.begin("arr_0", (num_samples, *first.shape), np.uint8)
        for i in tqdm(range(num_samples), desc="npz", unit="img", disable=not progress, dynamic_ncols=True):
            images.write(read_png(out / "images" / f"{i:06d}.png")[None])
        npz.add("arr_1", labels.numpy())
    return path


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def sample(args: argparse.Namespace) -> dict:
    cfg, model = load_model_for_inference(run=args.run, weights=args.weights, step=args.step)
    try:
        prompts = prompts_for(cfg, args.prompts)  # None for class-conditional models
    except ValueError as e:
        raise SampleError(str(e)) from None
    settings = resolve_settings(args, cfg, model)
    if prompts is not None:
        settings.update(prompts=prompts, num_samples=args.num_samples or SAMPLES_PER_PROMPT * len(prompts))
    classes = parse_classes(args.classes, cfg.model.num_classes)
    if settings["inference"] != "dense":
        try:
            moe.set_inference(model, settings["inference"], settings["threshold_shift"])
        except ValueError as e:
            raise SampleError(f"--inference: {e}") from None
    out = args.out or default_out(args, settings, cfg.name)
    check_settings(out, settings)  # every rank, before anything is written

    ctx: DistContext = init_distributed(cfg)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model.to(ctx.device, dtype).eval()
    objective, decode = build_diffusion(cfg), Decoder(cfg, ctx.device)
    text = build_text_conditioner(cfg, ctx.device, for_sampling=True) if prompts is not None else None
    if ctx.is_main:
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        print(f"sampling {settings['num_samples']} images of {cfg.name} from {settings['source']}: "
              f"cfg {settings['cfg_scale']:g}, {settings['sampler']} x {settings['steps']} steps, "
              f"inference {settings['inference']}, batch {args.batch_size} x {ctx.world_size} rank(s) -> {out}", flush=True)
    dist.barrier()
    start = time.time()
    made = generate_share(model, objective, decode, settings, classes, out, ctx, progress=not args.no_progress, text=text)
    # Per-rank averages weighted by images: each image contributes the same tokens per forward.
    weighted, images_made = all_sum([moe.average_activated_params(model) * made, made], ctx.device)
    dist.barrier()
    result = {"out": str(out), "generated": int(images_made), "seconds": round(time.time() - start, 1),
              "avg_activated_params": weighted / images_made if images_made else None,
              "nominal_activated_params": count_params(cfg)[2], **settings}
    if ctx.is_main:
        result.update(assemble(out, settings["num_samples"], classes, progress=not args.no_progress, prompts=prompts))
        if prompts is not None and args.run is not None:
            result["tensorboard_step"] = log_prompt_grid(args.run, args.step, Path(result["grid"]), prompts)
        (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        if result["avg_activated_params"] is not None:
            print(f"average activated params per image: {result['avg_activated_params'] / 1e6:.2f}M "
                  f"(nominal {result['nominal_activated_params'] / 1e6:.2f}M)", flush=True)
        print(json.dumps(result), flush=True)
    return result


def generate_share(model: DiT, objective: Objective, decode: Decoder, settings: dict, classes: list[int], out: Path,
                   ctx: DistContext, progress: bool, text: TextConditioner | None = None) -> int:
    """Generate this rank's unfinished batches as PNGs (text-conditioned models: from the prompts of
    `settings`, encoded by `text`); returns the number of images made."""
    batches = rank_batches(settings["num_samples"], settings["batch_size"], ctx.rank, ctx.world_size)
    todo = [b for b in batches if not all((out / "images" / f"{i:06d}.png").is_file() for i in b)]
    if ctx.is_main and len(todo) < len(batches):
        print(f"resuming: {len(batches) - len(todo)} of rank 0's {len(batches)} batches already done", flush=True)
    moe.reset_meters(model)
    made = sum(len(b) for b in todo)
    with tqdm(total=made, desc="sample", unit="img", disable=not (ctx.is_main and progress),
              dynamic_ncols=True) as bar:
        for indices in todo:
            condition = text.sampling_kwargs(prompts_of(settings["prompts"], indices)) if text is not None else {}
            latents = generate(model, objective, labels_of(indices, classes), seeds_of(indices, settings["seed"]),
                               settings["cfg_scale"], settings["steps"], settings["sampler"], **condition)
            for i, image in zip(indices, decode(latents)):
                write_png(out / "images" / f"{i:06d}.png", image)
            bar.update(len(indices))
    return made


def assemble(out: Path, num_samples: int, classes: list[int], progress: bool, prompts: list[str] | None = None) -> dict:
    """Rank 0, after every rank finished: the `.npz` (labels: class, or prompt number) and the grid, from the PNGs."""
    labels = labels_of(range(num_samples), classes) if prompts is None else torch.arange(num_samples) % len(prompts)
    npz = write_npz(out, num_samples, labels, progress)
    first = [torch.from_numpy(read_png(out / "images" / f"{i:06d}.png")) for i in range(min(num_samples, GRID_IMAGES))]
    nrow = None if prompts is None else min(len(prompts), GRID_IMAGES)  # one column per prompt
    save_grid(torch.stack(first).permute(0, 3, 1, 2).float() / 127.5 - 1, out / "grid.png", nrow)
    return {"npz": str(npz), "grid": str(out / "grid.png")}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return sample(args)
    except (SampleError, CheckpointError, ConfigError, DataError) as e:
        print(f"sample error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_then_exit(main)
