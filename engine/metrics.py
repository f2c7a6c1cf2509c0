"""Sample-quality metrics on feature vectors, as the ADM evaluator defines them.

    mu, sigma = feature_statistics(features)                 # float64 mean and covariance
    fid       = frechet_distance(mu1, sigma1, mu2, sigma2)   # FID (pool features), sFID (spatial)
    is_mean, is_std = inception_score(logits)                # splits of 5000 samples
    precision, recall = precision_recall(ref, samples, k=3)  # k-NN manifolds (Kynkaanniemi et al.)
"""
from __future__ import annotations

import numpy as np
import torch

IS_SPLIT_SIZE = 5000  # ADM: consecutive chunks of 5000 samples (10 splits for 50K)


def feature_statistics(features: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] in float64, accumulated in chunks (N x D float64
    copies of 50K x 2048 features would cost 800 MB)."""
    n = len(features)
    if n < 2:
        raise ValueError(f"statistics need at least 2 feature vectors, got {n}")
    mu = np.zeros(features.shape[1])
    for start in range(0, n, chunk):
        mu += features[start:start + chunk].sum(axis=0, dtype=np.float64)
    mu /= n
    sigma = np.zeros((features.shape[1], features.shape[1]))
    for start in range(0, n, chunk):
        centred = features[start:start + chunk].astype(np.float64) - mu
        sigma += centred.T @ centred
    return mu, sigma / (n - 1)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) between two Gaussians.

    Tr((S1 S2)^½) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^½ S2 S1^½ (similar to S1 S2): no complex parts, no singular-matrix retries."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt, 0.0))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per consecutive split of `split_size` samples; (mean, std)."""
    logits = np.asarray(logits, np.float64)
    scores = []
    for start in range(0, len(logits), split_size):
        part = logits[start:start + split_size]
        log_p = part - part.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        log_marginal = np.log(p.mean(axis=0))
        kl = (p * (log_p - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)).clamp_min_(0)


def knn_radii(features: torch.Tensor, k: int = 3, block: int = 1024) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set (self excluded)."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {len(features)}")
    radii = [torch.kthvalue(_squared_distances(features[i:i + block], features), k + 1, dim=1).values
             for i in range(0, len(features), block)]
    return torch.cat(radii)


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3, block: int = 1024,
                     device: torch.device | str = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, as in the ADM evaluator).

    Each set's manifold is the union of balls around its points with radius = distance to the k-th
    nearest neighbour. Precision: fraction of samples inside the reference manifold; recall:
    fraction of reference points inside the sample manifold."""
    ref_t = torch.as_tensor(np.asarray(ref), dtype=torch.float32, device=device)
    smp_t = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    ref_radii, smp_radii = knn_radii(ref_t, k, block), knn_radii(smp_t, k, block)
    sample_in_ref = torch.zeros(len(smp_t), dtype=torch.bool, device=device)
    ref_in_sample = torch.zeros(len(ref_t), dtype=torch.bool, device=device)
    for i in range(0, len(ref_t), block):
        d = _squared_distances(ref_t[i:i + block], smp_t)  # [ref block, samples]
        sample_in_ref |= (d <= ref_radii[i:i + block, None]).any(0)
        ref_in_sample[i:i + block] = (d <= smp_radii[None, :]).any(1)
    return float(sample_in_ref.float().mean()), float(ref_in_sample.float().mean())
