"""`eval/class_acc`: do class-conditional samples look like the digit they were asked for?

A reference classifier (an RBF support-vector machine on the 8x8 pixels) is fitted to the
held-out split of scikit-learn's digits, which the generator never trains on. `eval.num_samples`
samples of the EMA model, classes 0..9 in turn, are classified; the accuracy is the fraction
recognised as their own class. Real training-split digits score about 0.99, a generator of noise
or blanks about 0.1.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.svm import SVC
from torch import nn
from tqdm.auto import tqdm

from engine.data import load_digits_split
from engine.metrics import feature_statistics, frechet_distance
from engine.monitor import show_progress
from engine.sampling import generate

if TYPE_CHECKING:
    from engine.config import Config
    from engine.text_conditioning import TextConditioner
    from models.diffusion import Objective
    from parallel.zero import DistContext

DIGITS_SIZE = 8  # scikit-learn's digits are 8x8
EVAL_SEED_BASE = 1_000_000  # evaluation sample i uses seed EVAL_SEED_BASE + i (apart from grid seeds)


def classifier_features(images: torch.Tensor) -> np.ndarray:
    """[N, 1, S, S] pixels in [-1, 1] -> [N, 64] features at the digits' native 8x8."""
    x = images.detach().float().cpu().clamp(-1, 1)
    if x.shape[-1] != DIGITS_SIZE:
        x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x.reshape(len(x), -1).numpy()


def as_model_pixels(images_uint8: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, 8, 8] -> [N, 1, size, size] in [-1, 1], resized as the data loader does."""
    x = torch.from_numpy(images_uint8).float()[:, None] / 127.5 - 1.0
    if size != DIGITS_SIZE:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < DIGITS_SIZE)
    return x


def heldout_pixel_statistics(input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the held-out digits' 8x8-pixel features, seen through the model's
    resolution: the reference of `pixel_fid`."""
    images, _ = load_digits_split("heldout")
    return feature_statistics(classifier_features(as_model_pixels(images, input_size)))


def pixel_fid(images: torch.Tensor, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """Small-feature FID: the Frechet distance between the 64-d pixel features (those the reference
    classifier sees) of `images` ([N, 1, S, S] in [-1, 1]) and `reference` (heldout_pixel_statistics)."""
    return frechet_distance(*feature_statistics(classifier_features(images)), *reference)


class ReferenceClassifier:
    def __init__(self, svm: SVC, input_size: int):
        self.svm, self.input_size = svm, input_size

    @classmethod
    def fit(cls, cfg: Config) -> "ReferenceClassifier":
        """Fit on the held-out split, seen through the model's resolution (resize there and back)."""
        if cfg.model.in_channels != 1 or cfg.model.num_classes != 10:
            raise ValueError("eval/class_acc needs the digits model: model.in_channels=1, model.num_classes=10 "
                             "(or set eval.num_samples=0)")
        images, labels = load_digits_split("heldout")
        features = classifier_features(as_model_pixels(images, cfg.model.input_size))
        return cls(SVC(C=10.0, gamma="scale").fit(features, labels), cfg.model.input_size)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.svm.predict(classifier_features(images))


def eval_labels_and_seeds(num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i asks for class i mod 10 with seed EVAL_SEED_BASE + i."""
    i = torch.arange(num_samples)
    return i % 10, EVAL_SEED_BASE + i


@torch.no_grad()
def class_accuracy(model: nn.Module, objective: Objective, classifier: ReferenceClassifier, cfg: Config,
                   dist: DistContext, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
                   text: TextConditioner | None = None) -> float:
    """Fraction of `eval.num_samples` samples classified as their class (text-conditioned models
    are prompted with the class's caption through `text`). Collective: rank r draws
    samples r, r + W, ...; every rank runs the same number of batches (padded), so the model's
    collectives (expert parallelism) stay matched, and the result is the same for any world size."""
    n, world = cfg.eval.num_samples, dist.world_size
    labels, seeds = eval_labels_and_seeds(n)
    mine = torch.arange(dist.rank, n, world)
    per_rank = math.ceil(n / world)
    batch = cfg.eval.batch_size or cfg.train.micro_batch_size or max(1, cfg.train.global_batch_size // world)
    correct = torch.zeros(2, dtype=torch.float64)  # [correct, counted]
    batches = range(0, per_rank, batch)
    no_bar = not show_progress(dist.is_main and cfg.train.progress)
    for begin in tqdm(batches, desc="eval class_acc", disable=no_bar, leave=False):
        count = min(batch, per_rank - begin)
        chosen = mine[begin:begin + count]
        valid = len(chosen)
        if valid < count:  # pad with a sample of the job; padded results are not counted
            chosen = torch.cat([chosen, torch.zeros(count - valid, dtype=torch.long)])
        condition = text.label_kwargs(labels[chosen]) if text is not None else {}
        images = generate(model, objective, labels[chosen], seeds[chosen], cfg.eval.cfg_scale,
                          cfg.eval.sample_steps, cfg.diffusion.sampler, **condition)
        if valid:
            predicted = torch.from_numpy(classifier.predict(images[:valid]))
            correct += torch.tensor([float((predicted == labels[chosen[:valid]]).sum()), valid], dtype=torch.float64)
    device = next(model.parameters()).device
    total = all_reduce_sum(correct.to(device)).cpu()
    return float(total[0] / total[1])
