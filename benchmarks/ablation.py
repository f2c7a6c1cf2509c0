"""The miniature paper table: Dense vs TC vs EC vs DiffMoE at equal activated parameters on digits.

    python benchmarks/ablation.py [--quick] [--seeds 3] [--steps 800] [--jobs 2]

Every model is the quickstart DiT (configs/quickstart.yaml) with the FFN of every other block
replaced by 4 full-width experts (E4, hidden 4d), one expert per token on average, so all four
apply the dense model's parameters per token (plus a d x E router; the table lists exact counts):
  Dense    the quickstart's dense FFN
  TC       token choice, top-1, load-balance loss 0.01, no token dropped (TC-DiT: the reference has no
           capacity limit, so every token reaches its expert)
  EC       expert choice within each sample, capacity 1, no predictor (EC-DiT)
  DiffMoE  expert choice over the micro-batch's global token pool, capacity 1, capacity predictor
Each (model, seed) is one single-process `engine/train.py` run (subprocess, one thread each,
`--jobs` at a time). From its metrics.jsonl come the final training diffusion loss (mean over the
last record interval; the auxiliary losses differ by model and are left out) and `eval/class_acc`;
then `engine/sample.py` draws as many EMA samples as the held-out split has digits (static
inference) and a small-feature FID compares them with the held-out digits (engine/digits_eval.py's
`pixel_fid`: the Frechet distance on the 64 pixels at the digits' native 8x8, the features its
reference classifier sees). Writes the `ablation` section of
benchmarks/RESULTS.md (mean ± std over seeds); the last stdout line is JSON of the per-model means.
Re-running the same command after an interruption keeps the runs that finished (`ablation_result.json`)
as long as their resolved config is unchanged (a changed default is a new run).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.results import update_results  # noqa: E402
from benchmarks.train_runs import resolved_config, run_checked, same_config, train_run  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.data import load_digits_split  # noqa: E402
from engine.digits_eval import heldout_pixel_statistics, pixel_fid  # noqa: E402
from engine.params import count_params  # noqa: E402

CONFIG = REPO / "configs" / "quickstart.yaml"
MOE = ["model.moe.num_experts=4", "model.moe.every=2", "model.moe.capacity=1.0"]
MODELS: dict[str, list[str]] = {
    "Dense": ["model.moe.routing=dense"],
    "TC": MOE + ["model.moe.routing=token_choice", "model.moe.top_k=1", "model.moe.aux_loss_weight=0.01",
                 "model.moe.drop_tokens=false"],
    "EC": MOE + ["model.moe.routing=expert_choice", "model.moe.pool=sample", "model.moe.predictor=false"],
    "DiffMoE": MOE + ["model.moe.routing=diffmoe", "model.moe.pool=micro_batch", "model.moe.predictor=true"],
}
# measured ~1.6 min (quick) / ~3.7 min (default) per run on a free core; 4 models x seeds runs, 2 at a time:
# ~7 min (quick) and ~22 min (default), leaving room for a loaded machine within 15 / 60 minutes
DEFAULT = {"seeds": 3, "steps": 800, "batch": 128, "eval_samples": 200, "sample_steps": 20}
QUICK = {"seeds": 2, "steps": 300, "batch": 128, "eval_samples": 200, "sample_steps": 20}
EMA_HALF_LIFE = 1 / 8  # of the run: the evaluated EMA weights average the last ~quarter of training


def ema_decay(steps: int) -> float:
    """The quickstart's 0.995 would leave a short run's EMA near its initialisation."""
    return 0.5 ** (1 / max(1.0, EMA_HALF_LIFE * steps))


@dataclass
class Settings:
    seeds: int
    steps: int
    batch: int
    eval_samples: int
    sample_steps: int
    jobs: int
    out: Path

    def overrides(self, model: str, seed: int) -> list[str]:
        return MODELS[model] + [
            f"name=ablation_{model.lower()}_s{seed}", f"train.seed={seed}",
            f"train.output_dir={self.run_dir(model, seed)}",
            f"train.max_steps={self.steps}", f"train.global_batch_size={self.batch}", "train.micro_batch_size=0",
            f"train.warmup_steps={max(1, self.steps // 10)}", f"train.ema_decay={ema_decay(self.steps):.6f}",
            f"train.log_every={max(1, self.steps // 10)}",
            "train.sample_every=0", f"train.save_every={self.steps}", "train.resume=", "train.progress=false",
            f"eval.num_samples={self.eval_samples}", f"eval.sample_steps={self.sample_steps}", "eval.every=0",
            "data.num_workers=0",
        ]

    def run_dir(self, model: str, seed: int) -> Path:
        return self.out / f"{model.lower()}_s{seed}"


def npz_pixels(npz: Path) -> torch.Tensor:
    """uint8 NHWC samples (C = 1 for the digits model; RGB is averaged to grey) -> [N, 1, H, W] in [-1, 1]."""
    images = np.load(npz)["arr_0"]
    return torch.from_numpy(images).float().mean(-1)[:, None] / 127.5 - 1.0


def train_and_measure(settings: Settings, model: str, seed: int, reference: tuple[np.ndarray, np.ndarray],
                      num_fid_samples: int) -> dict[str, float]:
    run = settings.run_dir(model, seed)
    done = run / "ablation_result.json"
    overrides = settings.overrides(model, seed)
    if done.exists() and same_config(json.loads(done.read_text()).get("config", {}), CONFIG, overrides):
        return json.loads(done.read_text())["result"]  # finished by an earlier, interrupted invocation
    train_seconds = train_run(run, CONFIG, overrides)
    begin = time.time()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the diffusion loss alone: the auxiliary losses (TC balance, DiffMoE predictor BCE) differ by model
    loss = [r["diffusion_loss"] for r in records if r.get("diffusion_loss") is not None][-1]
    class_acc = [r["eval/class_acc"] for r in records if "eval/class_acc" in r][-1]
    out = run_checked([sys.executable, str(REPO / "engine" / "sample.py"), "--run", str(run),
                       "--num-samples", str(num_fid_samples), "--steps", str(settings.sample_steps),
                       "--batch-size", "64", "--out", str(run / "fid_samples"), "--no-progress"], run / "sample.log")
    summary = json.loads(out.strip().splitlines()[-1])
    result = {"loss": loss, "class_acc": class_acc, "fid": pixel_fid(npz_pixels(Path(summary["npz"])), reference),
              "minutes": (train_seconds + time.time() - begin) / 60}
    done.write_text(json.dumps({"config": resolved_config(CONFIG, overrides), "result": result}, indent=2) + "\n")
    return result


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def table(results: dict[str, list[dict[str, float]]], settings: Settings, quick: bool, params: dict[str, tuple]) -> str:
    lines = [
        f"{'Quick mode' if quick else 'Default mode'} (`python benchmarks/ablation.py{' --quick' if quick else ''}`): "
        f"configs/quickstart.yaml's DiT (depth 4, width 128, patch 2, digits 8x8), {settings.steps} steps at global "
        f"batch {settings.batch} (lr 1e-3, EMA decay {ema_decay(settings.steps):.4f}), {settings.seeds} seeds per "
        f"model ({settings.jobs} runs at a time, one thread each), MoE = E4 full-width experts in every other block "
        f"at 1 expert per token. TC is TC-DiT as the reference builds it: top-1, balance loss 0.01, kaiming-uniform "
        f"router init, no capacity limit, so it now drops no token (the table before the fidelity fixes of issue 14 "
        f"dropped tokens over capacity factor 1 in training); guided samples route their conditional and "
        f"unconditional halves in separate pools (model.moe.cfg_pool). `class_acc`: {settings.eval_samples} EMA samples, {settings.sample_steps} Euler "
        f"steps, cfg 2. FID: 8x8-pixel-feature FID (64-d) of as many EMA samples as held-out digits "
        f"({settings.sample_steps} steps, static inference) vs the held-out split. Lower loss / FID and higher "
        "class_acc are better.",
        "",
        "| model | total params | activated params | final diffusion loss | eval/class_acc | pixel FID | minutes / run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, runs in results.items():
        total, activated = params[model]
        lines.append(f"| {model} | {total / 1e6:.3f}M | {activated / 1e6:.3f}M | {mean_std([r['loss'] for r in runs])} | "
                     f"{mean_std([r['class_acc'] for r in runs])} | {mean_std([r['fid'] for r in runs])} | "
                     f"{statistics.mean(r['minutes'] for r in runs):.1f} |")
    by_fid = sorted(results, key=lambda m: statistics.mean(r["fid"] for r in results[m]))
    by_acc = sorted(results, key=lambda m: -statistics.mean(r["class_acc"] for r in results[m]))
    lines += ["", f"Ordering here, best first: by pixel FID {' < '.join(by_fid)}; by class_acc {' > '.join(by_acc)}. "
              "The papers' at scale (ImageNet 256 FID, REFERENCE.md): DiffMoE < EC < Dense < TC. Neighbours whose "
              "difference is within the seed standard deviations are not resolved at this size and length."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"fewer steps and seeds: {QUICK}")
    p.add_argument("--seeds", type=int, help=f"seeds per model (default {DEFAULT['seeds']}; quick {QUICK['seeds']})")
    p.add_argument("--steps", type=int,
                   help=f"training steps per run (default {DEFAULT['steps']}; quick {QUICK['steps']})")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "ablation", help="parent of the run directories")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    settings = Settings(seeds=args.seeds or base["seeds"], steps=args.steps or base["steps"], batch=base["batch"],
                        eval_samples=base["eval_samples"], sample_steps=base["sample_steps"], jobs=args.jobs,
                        out=args.out)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if settings.seeds < 1 or settings.steps < 1 or settings.jobs < 1:
        p.error("--seeds, --steps and --jobs must be positive")

    cfg = load_config(str(CONFIG), [])
    reference = heldout_pixel_statistics(cfg.model.input_size)
    num_fid_samples = len(load_digits_split("heldout")[1])
    params = {m: count_params(load_config(str(CONFIG), MODELS[m]))[1:] for m in models}
    jobs = [(m, s) for s in range(settings.seeds) for m in models]
    results: dict[str, list[dict[str, float]]] = {m: [] for m in models}
    with ThreadPoolExecutor(settings.jobs) as pool, tqdm(total=len(jobs), desc="ablation runs", unit="run") as bar:
        futures = {pool.submit(train_and_measure, settings, m, s, reference, num_fid_samples): (m, s) for m, s in jobs}
        for future, (m, s) in futures.items():
            r = future.result()
            results[m].append(r)
            bar.update()
            tqdm.write(f"{m} seed {s}: loss {r['loss']:.4f}  class_acc {r['class_acc']:.3f}  FID {r['fid']:.3f}  "
                       f"({r['minutes']:.1f} min)")
    update_results("ablation", table(results, settings, args.quick, params))
    headline = {m: {k: round(statistics.mean(r[k] for r in runs), 4) for k in ("loss", "class_acc", "fid")}
                for m, runs in results.items()}
    headline["settings"] = {"steps": settings.steps, "seeds": settings.seeds, "batch": settings.batch}
    print(json.dumps(headline), flush=True)
    return headline


if __name__ == "__main__":
    main()
