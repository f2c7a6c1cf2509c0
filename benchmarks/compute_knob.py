"""The compute knob, measured: DiffMoE's sample quality against the parameters it applies per token,
static inference (capacity swept) vs dynamic inference (threshold_shift swept).

    python benchmarks/compute_knob.py [--seeds 3] [--jobs 2] [--sample-steps 20]

The model is the quickstart (configs/quickstart.yaml: DiT depth 4, width 128, E4 full-width
experts in blocks 1 and 3, capacity 1, capacity predictor) trained on the embedded digits. The
seeds are trained models: seed s is the quickstart config with train.seed=s, trained in
runs/compute_knob/train_s{s} (a single-process `engine/train.py` run, one thread, `--jobs` at a
time; kept for the next invocation while its resolved config is unchanged). Seed 0 is the
quickstart run itself (`runs/quickstart`) when that run is present, finished and of the same
model, diffusion and training settings. Every point of every model samples the same images: as
many as the held-out split has digits, sample i of class i mod 10 from the fixed noise of
engine/digits_eval.py's evaluation seeds, with the model's EMA weights, Euler steps and the
quickstart's cfg 2, in batches of 64 (static inference pools over that batch). So the points of
one model differ by routing alone.

For each point: the MEASURED activated parameters per token (models.moe.average_activated_params
over every forward of the point: the dense parameters plus the experts each token was actually
sent to, the predictor excluded, as in the papers' counts), the pixel FID of the samples vs the
held-out digits (engine/digits_eval.py's `pixel_fid`, also used by benchmarks/ablation.py) and the
class accuracy of the reference classifier. Static and dynamic inference are compared at equal
activated parameters by interpolating each model's static curve (FID is piecewise linear in the
activated parameters between capacities). The claim under test (DiffMoE's): dynamic inference
reaches the quality of static inference at the training capacity with fewer activated parameters.

Writes docs/compute_knob.png (activated params vs FID and vs class accuracy, one curve per mode,
mean ± std over the seeds), the `compute_knob` section of benchmarks/RESULTS.md, and, as the last
stdout line, JSON of the headline.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.results import update_results  # noqa: E402
from benchmarks.train_runs import resolved_config, train_run  # noqa: E402
from engine.config import Config, load_config  # noqa: E402
from engine.data import load_digits_split  # noqa: E402
from engine.digits_eval import ReferenceClassifier, eval_labels_and_seeds, heldout_pixel_statistics, pixel_fid  # noqa: E402
from engine.export import load_model_for_inference  # noqa: E402
from engine.params import count_params  # noqa: E402
from engine.sampling import generate  # noqa: E402
from models import moe  # noqa: E402
from models.diffusion import build_diffusion  # noqa: E402

CONFIG = REPO / "configs" / "quickstart.yaml"
QUICKSTART_RUN = REPO / "runs" / "quickstart"
FIGURE = REPO / "docs" / "compute_knob.png"
CAPACITIES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # static: average experts per token (E = 4 experts)
# dynamic: added to the predictor thresholds (~0.4-0.55 here). The trained predictor is nearly binary
# (most probabilities < 0.06 or > 0.95), so compute moves little until threshold + shift nears 0 or 1.
SHIFTS = (-0.5, -0.45, -0.4, -0.3, 0.0, 0.3, 0.4, 0.45, 0.5, 0.55)
TRAINED_CAPACITY = 1.0  # the quickstart's model.moe.capacity: the static reference point
ZOOM = (0.5, 2.0)  # capacities bounding the figure's zoomed FID panel
ZOOM_FID = 1.25  # its FID scale reaches this multiple of the static capacity-1 FID
SAMPLE_BATCH = 64
# the training settings a reused quickstart run must share with seed 0 (the rest does not touch the weights)
WEIGHT_KEYS = ("seed", "max_steps", "global_batch_size", "lr", "weight_decay", "betas", "warmup_steps", "grad_clip",
               "ema_decay", "precision")


@dataclass(frozen=True)
class Point:
    mode: str  # "static" or "dynamic"
    knob: float  # capacity (static) or threshold_shift (dynamic)

    @property
    def label(self) -> str:
        return f"capacity {self.knob:g}" if self.mode == "static" else f"shift {self.knob:+g}"


def sweep_points(capacities: tuple[float, ...] = CAPACITIES, shifts: tuple[float, ...] = SHIFTS) -> list[Point]:
    return [Point("static", c) for c in capacities] + [Point("dynamic", s) for s in shifts]


# --------------------------------------------------------------------------------------------
# The trained models
# --------------------------------------------------------------------------------------------


def train_overrides(seed: int, run: Path) -> list[str]:
    """The quickstart as it is, at another seed; no end-of-training evaluation (measured here)."""
    return [f"name=compute_knob_s{seed}", f"train.seed={seed}", f"train.output_dir={run}", "train.resume=",
            "train.sample_every=0", "train.progress=false", "eval.num_samples=0", "data.num_workers=0"]


def quickstart_matches(run: Path, want: dict) -> bool:
    """`run` (the quickstart's directory) trained to the end the model `want` (a resolved config) describes."""
    saved_path, metrics = run / "config.yaml", run / "metrics.jsonl"
    if not saved_path.is_file() or not metrics.is_file():
        return False
    saved = yaml.safe_load(saved_path.read_text())
    steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines() if line.strip()]
    return (saved.get("model") == want["model"] and saved.get("diffusion") == want["diffusion"]
            and saved.get("data", {}).get("source") == want["data"]["source"]
            and all(saved.get("train", {}).get(k) == want["train"][k] for k in WEIGHT_KEYS)
            and want["train"]["max_steps"] in steps)


def trained_run(seed: int, out: Path) -> Path:
    """The run directory of the model of `seed`, training it when needed."""
    run = out / f"train_s{seed}"
    overrides = train_overrides(seed, run)
    if seed == 0 and quickstart_matches(QUICKSTART_RUN, resolved_config(CONFIG, overrides)):
        return QUICKSTART_RUN
    train_run(run, CONFIG, overrides)
    return run


# --------------------------------------------------------------------------------------------
# Measuring one point
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def measure(model: torch.nn.Module, cfg: Config, point: Point, labels: torch.Tensor, seeds: torch.Tensor,
            steps: int, classifier: ReferenceClassifier, reference: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Sample `labels` from the noise of `seeds` at `point`: measured activated params per token,
    pixel FID and class accuracy."""
    if point.mode == "static":
        moe.set_inference(model, "static", capacity=point.knob)
    else:
        moe.set_inference(model, "dynamic", threshold_shift=point.knob)
    objective = build_diffusion(cfg)
    moe.reset_meters(model)
    images = torch.cat([generate(model, objective, labels[b:b + SAMPLE_BATCH], seeds[b:b + SAMPLE_BATCH],
                                 cfg.eval.cfg_scale, steps, cfg.diffusion.sampler)
                        for b in range(0, len(labels), SAMPLE_BATCH)])
    # every forward of the point holds the same number of tokens per image: the meter's token
    # average is the average over all the point's images and steps
    params = moe.average_activated_params(model)
    class_acc = float((torch.from_numpy(classifier.predict(images)) == labels).float().mean())
    return {"activated_params": params, "fid": pixel_fid(images, reference), "class_acc": class_acc}


def sweep(run: Path, points: list[Point], steps: int, bar: tqdm) -> list[dict[str, float]]:
    cfg, model = load_model_for_inference(run=run)
    n = len(load_digits_split("heldout")[1])
    labels, seeds = eval_labels_and_seeds(n)
    classifier = ReferenceClassifier.fit(cfg)
    reference = heldout_pixel_statistics(cfg.model.input_size)
    results = []
    for point in points:
        results.append(measure(model, cfg, point, labels, seeds, steps, classifier, reference))
        bar.update()
    return results


# --------------------------------------------------------------------------------------------
# Static vs dynamic at equal activated parameters
# --------------------------------------------------------------------------------------------


def fid_at(curve: list[dict[str, float]], params: float) -> float | None:
    """A curve's FID at `params`, linear between its points; None outside the swept range."""
    xs = [r["activated_params"] for r in curve]
    if not min(xs) <= params <= max(xs):
        return None
    order = np.argsort(xs)
    return float(np.interp(params, np.asarray(xs)[order], np.asarray([r["fid"] for r in curve])[order]))


def params_to_reach(curve: list[dict[str, float]], fid: float) -> float | None:
    """Fewest activated params at which the piecewise-linear FID curve (sorted by params) reaches
    `fid` or better; None when no point does."""
    pts = sorted((r["activated_params"], r["fid"]) for r in curve)
    if pts[0][1] <= fid:
        return pts[0][0]
    for (x0, f0), (x1, f1) in zip(pts, pts[1:]):
        if f1 <= fid:
            return x0 + (x1 - x0) * (f0 - fid) / (f0 - f1)  # f0 > fid >= f1: the crossing
    return None


def compare(points: list[Point], results: list[dict[str, float]]) -> dict[str, float | None]:
    """One model: static at the training capacity vs dynamic at equal activated params."""
    static = [r for p, r in zip(points, results) if p.mode == "static"]
    dynamic = [r for p, r in zip(points, results) if p.mode == "dynamic"]
    ref = next(r for p, r in zip(points, results) if p.mode == "static" and p.knob == TRAINED_CAPACITY)
    gaps = [r["fid"] - s for r in dynamic if (s := fid_at(static, r["activated_params"])) is not None]
    return {
        "static_params": ref["activated_params"], "static_fid": ref["fid"],
        "dynamic_fid_at_static_params": fid_at(dynamic, ref["activated_params"]),
        # the claim: the params dynamic inference needs for static capacity-1 quality, and, as the
        # fair yardstick, the params the static curve itself needs for it
        "dynamic_params_for_static_fid": params_to_reach(dynamic, ref["fid"]),
        "static_params_for_static_fid": params_to_reach(static, ref["fid"]),
        "lowest_dynamic_params": min(r["activated_params"] for r in dynamic),
        "mean_fid_gap_at_equal_params": float(np.mean(gaps)) if gaps else None,  # dynamic - static, < 0: dynamic better
    }


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def mean_std(values: list[float], scale: float = 1.0, digits: int = 4) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) / scale:.{digits}f} ± {std / scale:.{digits}f}"


def summarize(points: list[Point], per_seed: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per point: mean and std over the seeds of each measure."""
    rows = []
    for i, point in enumerate(points):
        row: dict = {"mode": point.mode, "knob": point.knob}
        for key in ("activated_params", "fid", "class_acc"):
            values = [seed[i][key] for seed in per_seed]
            row[key] = statistics.mean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def plot(rows: list[dict[str, float]], total_params: int, path: Path, title: str) -> None:
    """FID over the whole sweep, FID near the training compute (ZOOM, where the modes overlap) and
    class accuracy, each against the measured activated params; one curve per mode."""
    import matplotlib
    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    styles = {"static": ("tab:blue", "o", "static inference (label: capacity)"),
              "dynamic": ("tab:orange", "s", "dynamic inference (label: threshold_shift)")}
    ref = next(r for r in rows if r["mode"] == "static" and r["knob"] == TRAINED_CAPACITY)
    static = [r for r in rows if r["mode"] == "static"]
    # activated params are linear in experts per token: the static points give the line (top axis)
    slope, base = np.polyfit([r["knob"] for r in static], [r["activated_params"] / 1e6 for r in static], 1)
    pad = 0.03 * (ZOOM[1] - ZOOM[0]) * slope
    zoom = (base + ZOOM[0] * slope - pad, base + ZOOM[1] * slope + pad)
    panels = ((axes[0], "fid", "pixel FID vs held-out digits (lower is better)", None),
              (axes[1], "fid", f"pixel FID, capacity {ZOOM[0]:g}-{ZOOM[1]:g} (zoom)", zoom),
              (axes[2], "class_acc", "class accuracy (higher is better)", None))
    for ax, key, ylabel, window in panels:
        shown = [r for r in rows if window is None or window[0] <= r["activated_params"] / 1e6 <= window[1]]
        span = max(r["activated_params"] for r in shown) - min(r["activated_params"] for r in shown)
        for mode, (color, marker, label) in styles.items():
            curve = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["activated_params"])
            ax.errorbar([r["activated_params"] / 1e6 for r in curve], [r[key] for r in curve],
                        xerr=[r["activated_params_std"] / 1e6 for r in curve], yerr=[r[key + "_std"] for r in curve],
                        color=color, marker=marker, capsize=3, label=label)
            last = -np.inf
            for r in (r for r in curve if r in shown):  # labels that would print over the previous one are skipped
                if r["activated_params"] - last < 0.04 * span:
                    continue
                last = r["activated_params"]
                text = f"{r['knob']:g}" if mode == "static" else f"{r['knob']:+g}"
                ax.annotate(text, (r["activated_params"] / 1e6, r[key]), textcoords="offset points",
                            xytext=(4, 6 if mode == "static" else -12), fontsize=7, color=color)
        if window is not None:  # points over ZOOM_FID x the static capacity-1 FID stay off the zoom's scale
            near = [r[key] for r in shown if r[key] <= ZOOM_FID * ref[key]]
            low, high = min(near), max(near)
            margin = 0.08 * (high - low)
            ax.set_xlim(*window)
            ax.set_ylim(low - margin, high + margin)
        ax.axvline(ref["activated_params"] / 1e6, color="grey", ls=":", lw=1)
        ax.axhline(ref[key], color="grey", ls=":", lw=1)
        top = ax.secondary_xaxis("top", functions=(lambda m: (m - base) / slope, lambda c: base + c * slope))
        top.set_xlabel("experts per token (MoE layers)", fontsize=8)
        ax.set_xlabel(f"measured activated parameters per token (M; total {total_params / 1e6:.2f}M)", fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict[str, float]], comparisons: list[dict], seeds: int, steps: int, total: int,
           n_samples: int) -> tuple[str, dict]:
    def values(key: str) -> list[float] | None:
        found = [c[key] for c in comparisons]
        return None if any(v is None for v in found) else found

    def mean_m(key: str) -> str:
        found = values(key)
        return f"{mean_std(found, 1e6)}M" if found else "not reached by every model"

    claim = [c["dynamic_params_for_static_fid"] is not None and c["dynamic_params_for_static_fid"] < c["static_params"]
             for c in comparisons]
    fewer_than_static = [c["dynamic_params_for_static_fid"] is not None and c["static_params_for_static_fid"] is not None
                         and c["dynamic_params_for_static_fid"] < c["static_params_for_static_fid"] for c in comparisons]
    bound = sum(c["dynamic_params_for_static_fid"] == c["lowest_dynamic_params"] for c in comparisons)
    dyn_at, gap = values("dynamic_fid_at_static_params"), values("mean_fid_gap_at_equal_params")
    lines = [
        f"`python benchmarks/compute_knob.py`: configs/quickstart.yaml's DiffMoE (E4, capacity 1, predictor; "
        f"{total / 1e6:.3f}M parameters) trained {seeds} times (train.seed 0..{seeds - 1}, 1000 steps each: the "
        f"seeds are trained models); every point samples the same {n_samples} images (one per held-out digit, "
        f"class i mod 10, fixed noise) with the EMA weights, {steps} Euler steps, cfg 2, batches of {SAMPLE_BATCH}. "
        "Activated params: measured per token over every forward of the point (dense parameters + the experts "
        "each token was sent to; predictor excluded). Pixel FID: 8x8-pixel-feature FID vs the held-out digits (as "
        "in the ablation). Mean ± std over the trained models. Static inference: each expert takes k = "
        "int(pool / E * capacity) tokens of its pool (the batch; conditional and unconditional halves apart); "
        "dynamic inference: a token goes to every expert whose predictor probability exceeds its (EMA) threshold "
        "+ threshold_shift. Figure: [docs/compute_knob.png](../docs/compute_knob.png).",
        "",
        "| mode | knob | activated params (M) | pixel FID | class_acc |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        knob = f"capacity {r['knob']:g}" if r["mode"] == "static" else f"threshold_shift {r['knob']:+g}"
        lines.append(f"| {r['mode']} | {knob} | {r['activated_params'] / 1e6:.4f} ± {r['activated_params_std'] / 1e6:.4f} "
                     f"| {r['fid']:.4f} ± {r['fid_std']:.4f} | {r['class_acc']:.4f} ± {r['class_acc_std']:.4f} |")
    lines += [
        "",
        f"At the training's compute ({statistics.mean(values('static_params')) / 1e6:.4f}M activated, static "
        f"capacity {TRAINED_CAPACITY:g}): static FID {mean_std(values('static_fid'))}, dynamic FID at the same "
        "activated params (interpolated) " + (mean_std(dyn_at) if dyn_at else "n/a (outside a model's dynamic sweep)")
        + ". Activated params that reach static capacity-1 FID: dynamic " + mean_m("dynamic_params_for_static_fid")
        + (f" ({bound} of {seeds} models already at their lowest dynamic point: an upper bound there)" if bound else "")
        + ", static itself (lower capacity) " + mean_m("static_params_for_static_fid") + ". Mean FID difference "
        "dynamic - static at equal activated params (the dynamic points inside the static range; < 0: dynamic "
        "better): " + (mean_std(gap) if gap else "n/a") + ".",
        "",
        f"The claim (dynamic inference reaches static quality with fewer activated params than static inference "
        f"at the training capacity) holds for {sum(claim)} of {seeds} models; dynamic needs fewer params than the "
        f"static curve itself for that quality in {sum(fewer_than_static)} of {seeds}. Differences smaller than "
        "the std over models are not resolved at this size.",
    ]
    headline = {
        "static_capacity_1": {"activated_params": round(statistics.mean(values("static_params"))),
                              "fid": round(statistics.mean(values("static_fid")), 4)},
        "dynamic_at_equal_params": {"fid": round(statistics.mean(dyn_at), 4) if dyn_at else None},
        "params_for_static_fid": {mode: round(statistics.mean(v)) if (v := values(f"{mode}_params_for_static_fid"))
                                  else None for mode in ("dynamic", "static")},
        "fid_gap_dynamic_minus_static": round(statistics.mean(gap), 4) if gap else None,
        "claim_holds_models": f"{sum(claim)}/{seeds}",
        "dynamic_beats_static_curve_models": f"{sum(fewer_than_static)}/{seeds}",
        "settings": {"seeds": seeds, "sample_steps": steps, "samples": n_samples},
    }
    return "\n".join(lines), headline


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="trained models (train.seed 0..N-1)")
    p.add_argument("--jobs", type=int, default=2, help="trainings / sweeps side by side (one thread each)")
    p.add_argument("--sample-steps", type=int, default=20, help="Euler steps of every sample")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "compute_knob", help="parent of the trained runs")
    p.add_argument("--figure", type=Path, default=FIGURE)
    args = p.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1 or args.sample_steps < 1:
        p.error("--seeds, --jobs and --sample-steps must be positive")
    torch.set_num_threads(1)  # one thread per sweep, `--jobs` seeds side by side
    points = sweep_points()
    with tqdm(total=args.seeds, desc="trained models", unit="model", position=0) as trained, \
            tqdm(total=args.seeds * len(points), desc="sweep points", unit="point", position=1) as swept:
        def seed_job(seed: int) -> tuple[Path, list[dict[str, float]]]:
            run = trained_run(seed, args.out)  # a seed's sweep overlaps the next seed's training
            trained.update()
            return run, sweep(run, points, args.sample_steps, swept)

        with ThreadPoolExecutor(args.jobs) as pool:
            runs, per_seed = zip(*pool.map(seed_job, range(args.seeds)))
    rows = summarize(points, per_seed)
    comparisons = [compare(points, results) for results in per_seed]
    total = count_params(load_config(str(CONFIG)))[1]
    n_samples = len(load_digits_split("heldout")[1])
    markdown, headline = report(rows, comparisons, args.seeds, args.sample_steps, total, n_samples)
    plot(rows, total, args.figure, f"DiffMoE quickstart on digits: static vs dynamic inference "
                                   f"({args.seeds} trained models, {n_samples} samples per point)")
    update_results("compute_knob", markdown)
    for run, results in zip(runs, per_seed):
        tqdm.write(f"{run}: " + "; ".join(f"{p.label} {r['activated_params'] / 1e6:.4f}M FID {r['fid']:.3f}"
                                          for p, r in zip(points, results)))
    print(json.dumps(headline), flush=True)
    return headline


if __name__ == "__main__":
    main()
