"""FID, sFID, Inception Score and precision/recall of a sample batch against a reference.

    python engine/evaluate.py --samples S.npz --ref REF.npz [--inception PATH] [--batch-size B]
    python engine/evaluate.py --samples REF.npz --save-stats REF_STATS.npz    # reference statistics once

`S.npz` / `REF.npz` are ADM-evaluator batches (`arr_0` = uint8 [N, H, W, 3]); a reference may
instead (or also) hold statistics `mu`, `sigma` (+ `mu_s`, `sigma_s` for sFID), as ADM's reference
batches and `--save-stats` files do: FID then uses them, precision/recall needs the images. The
Inception weights are a local file (docs/evaluation.md says where to get them). The last line of
stdout is the JSON result, also written to `--out` (default `S.metrics.json`).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

if __package__ in (None, ""):  # `python engine/evaluate.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.inception import FeatureExtractor, load_inception
from engine.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from engine.npz_io import iter_npz_rows, npz_array_info, npz_keys

STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}  # ADM's names


@dataclass
class FeatureSet:
    """Features of one image set, or (for a statistics-only reference) just their statistics."""

    source: str
    count: int
    features: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def statistics(self, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
        if kind not in self.stats and kind in self.features:
            self.stats[kind] = feature_statistics(self.features[kind])
        return self.stats.get(kind)


def extract_features(path: str | Path, extractor: FeatureExtractor, batch_size: int,
                     device: torch.device | str, desc: str) -> FeatureSet:
    """Run `extractor` over `arr_0` of an `.npz` in batches; float32 numpy features per kind."""
    if "arr_0" not in npz_keys(path):
        raise ValueError(f"{path}: no image array 'arr_0'")
    shape, dtype = npz_array_info(path)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3] images (NHWC), got {dtype} {shape}")
    chunks: dict[str, list[np.ndarray]] = {}
    for batch in tqdm(iter_npz_rows(path, "arr_0", batch_size), total=-(-shape[0] // batch_size),
                      desc=desc, unit="batch", dynamic_ncols=True):
        out = extractor(torch.from_numpy(batch.copy()).to(device))
        for kind, value in out.items():
            chunks.setdefault(kind, []).append(value.float().cpu().numpy())
    if "pool" not in chunks:
        raise ValueError(f"feature extractor {extractor.name!r} returned no 'pool' features")
    return FeatureSet(str(path), shape[0], {kind: np.concatenate(parts) for kind, parts in chunks.items()})


def load_reference(path: str | Path, extractor: FeatureExtractor, batch_size: int, device: torch.device | str,
                   recompute_stats: bool = False) -> FeatureSet:
    """Images (features computed here) and/or statistics stored in the reference `.npz`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference not found: {path}")
    keys = set(npz_keys(path))
    ref = extract_features(path, extractor, batch_size, device, "reference") if "arr_0" in keys else FeatureSet(str(path), 0)
    if recompute_stats and "arr_0" in keys:
        return ref
    with np.load(path) as data:
        if "extractor" in keys and str(data["extractor"]) != extractor.name:
            raise ValueError(f"{path}: statistics were computed with {str(data['extractor'])!r}, "
                             f"not with {extractor.name!r}")
        for kind, (mu_key, sigma_key) in STAT_KEYS.items():
            if mu_key in keys and sigma_key in keys:
                ref.stats[kind] = (data[mu_key].astype(np.float64), data[sigma_key].astype(np.float64))
        if "count" in keys and not ref.count:
            ref.count = int(data["count"])
    if "pool" not in ref.stats and "pool" not in ref.features:
        raise ValueError(f"{path}: neither images 'arr_0' nor statistics 'mu'/'sigma'")
    return ref


def save_statistics(path: str | Path, features: FeatureSet, extractor_name: str) -> None:
    """Write ADM-style statistics (mu, sigma, mu_s, sigma_s) usable as a `--ref`."""
    arrays: dict[str, np.ndarray] = {"extractor": np.array(extractor_name), "count": np.array(features.count)}
    for kind, (mu_key, sigma_key) in STAT_KEYS.items():
        stats = features.statistics(kind)
        if stats is not None:
            arrays[mu_key], arrays[sigma_key] = stats
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _frechet(samples: FeatureSet, ref: FeatureSet, kind: str) -> float | None:
    ours, theirs = samples.statistics(kind), ref.statistics(kind)
    if ours is None or theirs is None:
        return None
    if ours[0].shape != theirs[0].shape:
        raise ValueError(f"{ref.source}: {kind} statistics have {theirs[0].shape[0]} dimensions, "
                         f"the extractor gives {ours[0].shape[0]}")
    return frechet_distance(*ours, *theirs)


def compute_metrics(samples: FeatureSet, ref: FeatureSet, k: int = 3, device: torch.device | str = "cpu") -> dict:
    """Every metric the available features allow; the others are None."""
    result: dict = {"fid": _frechet(samples, ref, "pool"), "sfid": _frechet(samples, ref, "spatial"),
                    "inception_score": None, "inception_score_std": None, "precision": None, "recall": None}
    if "logits" in samples.features:
        result["inception_score"], result["inception_score_std"] = inception_score(samples.features["logits"])
    if "pool" in ref.features:
        result["precision"], result["recall"] = precision_recall(ref.features["pool"], samples.features["pool"],
                                                                 k=k, device=device)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", required=True, help="sample batch .npz (arr_0 uint8 NHWC)")
    p.add_argument("--ref", help="reference batch .npz: images (arr_0) and/or statistics (mu, sigma[, mu_s, sigma_s])")
    p.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--k", type=int, default=3, help="neighbourhood size of the precision/recall manifolds")
    p.add_argument("--recompute-ref-stats", action="store_true",
                   help="compute FID statistics from the reference images even if the file stores some")
    p.add_argument("--save-stats", help="also write the statistics of --samples here (a future --ref)")
    p.add_argument("--out", help="JSON result file (default: SAMPLES with suffix .metrics.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.ref is None and args.save_stats is None:
        p.error("give --ref (to evaluate) and/or --save-stats (to store statistics)")
    if args.batch_size < 1 or args.k < 1:
        p.error("--batch-size and --k must be positive")
    return args


def _summary(result: dict) -> str:
    def fmt(key: str, name: str, digits: int = 2) -> str:
        return f"{name} {result[key]:.{digits}f}" if result.get(key) is not None else f"{name} n/a"

    return " | ".join([fmt("fid", "FID"), fmt("sfid", "sFID"), fmt("inception_score", "IS"),
                       fmt("precision", "precision", 3), fmt("recall", "recall", 3)])


def run(args: argparse.Namespace, extractor: FeatureExtractor | None = None) -> dict:
    device = torch.device(args.device)
    if extractor is None:
        extractor = load_inception(args.inception, device)
    elif isinstance(extractor, nn.Module):
        extractor.to(device)
    samples_path = Path(args.samples)
    if not samples_path.is_file():
        raise FileNotFoundError(f"samples not found: {samples_path}")
    samples = extract_features(samples_path, extractor, args.batch_size, device, "samples")
    result: dict = {"samples": str(samples_path), "num_samples": samples.count, "feature_extractor": extractor.name}
    if args.save_stats:
        save_statistics(args.save_stats, samples, extractor.name)
        result["saved_stats"] = args.save_stats
    if args.ref:
        ref = load_reference(args.ref, extractor, args.batch_size, device, args.recompute_ref_stats)
        result.update(ref=str(args.ref), num_ref=ref.count, **compute_metrics(samples, ref, args.k, device))
        print(f"{_summary(result)}   ({samples.count} samples vs {ref.count or 'precomputed'} reference)", flush=True)
    out = Path(args.out) if args.out else samples_path.with_suffix(".metrics.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None, extractor: FeatureExtractor | None = None) -> dict:
    """CLI entry; `extractor` replaces the Inception network (tests inject a tiny one here)."""
    args = parse_args(argv)
    try:
        return run(args, extractor)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
