"""Evaluation metrics against closed forms, and the CLI with an injected tiny feature extractor."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from engine import evaluate
from engine.inception import InceptionV3, load_inception, resize_bilinear_tf1
from engine.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from engine.npz_io import NpzWriter, iter_npz_rows


class PixelFeatures:
    """Tiny extractor: pool = pixels / 255, spatial = first channel, logits = 10 * pool @ W."""

    name = "pixels"

    def __init__(self, dim: int = 12, classes: int = 4):
        self.weight = torch.linspace(-1, 1, dim * classes).reshape(dim, classes)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool = images.flatten(1).float() / 255
        return {"pool": pool, "spatial": images[..., 0].flatten(1).float() / 255, "logits": 10 * pool @ self.weight}


def random_images(n: int, seed: int, size: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def scipy_fid(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's matrix square root (independent of engine.metrics)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def test_fid_of_identical_statistics_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    mu, sigma = feature_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9 * np.trace(sigma))


def test_fid_of_two_gaussians_matches_the_formula():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)  # non-commuting covariances
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-9)
    # Diagonal covariances: ||mu1 - mu2||² + sum (sqrt(a_i) - sqrt(b_i))²
    da, db = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = np.sum((mu1[:3] - mu2[:3]) ** 2) + np.sum((np.sqrt(da) - np.sqrt(db)) ** 2)
    assert frechet_distance(mu1[:3], np.diag(da), mu2[:3], np.diag(db)) == pytest.approx(expected, rel=1e-12)
    # One dimension: (m1 - m2)² + (sd1 - sd2)²
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == pytest.approx(10.0)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # the scipy reference, not ours
def test_fid_handles_singular_covariances():
    rng = np.random.default_rng(3)
    low_rank = rng.normal(size=(8, 2))
    s1, s2 = low_rank @ low_rank.T, np.diag([1.0] * 4 + [0.0] * 4)  # rank 2 and rank 4
    mu = np.zeros(8)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(scipy_fid(mu, s1, mu, s2), abs=1e-6)


def test_feature_statistics_match_numpy():
    features = np.random.default_rng(4).normal(size=(1000, 5)).astype(np.float32)
    mu, sigma = feature_statistics(features, chunk=64)
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-10)


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def test_inception_score_closed_forms():
    classes = 10
    confident = np.full((1000, classes), -50.0)
    confident[np.arange(1000), np.arange(1000) % classes] = 50.0  # one-hot, classes equally often
    assert inception_score(confident)[0] == pytest.approx(classes, rel=1e-9)
    assert inception_score(np.zeros((1000, classes))) == pytest.approx((1.0, 0.0))  # uniform: no information
    # Half one-hot on class 0, half uniform over 2 classes: marginal (3/4, 1/4), E[KL] = 3/4 log(4/3).
    mixed = np.array([[50.0, 0.0]] * 500 + [[0.0, 0.0]] * 500)
    assert inception_score(mixed)[0] == pytest.approx((4 / 3) ** 0.75, rel=1e-9)
    # Splits are consecutive chunks: two identical halves give std 0.
    mean, std = inception_score(np.concatenate([confident, confident]), split_size=1000)
    assert (mean, std) == (pytest.approx(classes), pytest.approx(0.0, abs=1e-9))


# --------------------------------------------------------------------------------------------
# Precision / recall
# --------------------------------------------------------------------------------------------


def test_precision_recall_identical_and_disjoint_sets():
    x = np.random.default_rng(5).normal(size=(300, 8))
    assert precision_recall(x, x.copy(), k=3, block=64) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_hand_computed():
    ref = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])  # k=1 radius of each point: 1
    samples = np.array([[0.5], [10.0]])  # 0.5 inside, 10 outside; sample radii: 9.5
    precision, recall = precision_recall(ref, samples, k=1)
    assert precision == 0.5
    assert recall == 1.0  # every ref point is within 9.5 of 0.5 or 10
    precision, recall = precision_recall(ref, np.array([[0.5], [1.5]]), k=1)  # sample radii: 1
    assert (precision, recall) == (1.0, pytest.approx(0.6))  # refs 0, 1, 2 covered (|.|<=1)


# --------------------------------------------------------------------------------------------
# CLI with an injected extractor
# --------------------------------------------------------------------------------------------


def write_npz(path, images, **extra) -> str:
    np.savez(path, arr_0=images, **extra)
    return str(path)


def run_cli(args: list[str], capsys) -> tuple[dict, str]:
    result = evaluate.main(args, extractor=PixelFeatures())
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == result  # the last stdout line is the JSON result
    return result, out[0]


def test_cli_identical_sets(tmp_path, capsys):
    images = random_images(64, seed=0)
    samples = write_npz(tmp_path / "s.npz", images, arr_1=np.arange(64))
    ref = write_npz(tmp_path / "r.npz", images)
    result, summary = run_cli(["--samples", samples, "--ref", ref, "--batch-size", "10", "--device", "cpu"], capsys)
    assert result["fid"] == pytest.approx(0, abs=1e-9) and result["sfid"] == pytest.approx(0, abs=1e-9)
    assert (result["precision"], result["recall"]) == (1.0, 1.0)
    assert result["num_samples"] == result["num_ref"] == 64 and result["feature_extractor"] == "pixels"
    assert summary.startswith("FID 0.00 | sFID 0.00 | IS ")
    assert json.loads((tmp_path / "s.metrics.json").read_text()) == result


def test_cli_fid_matches_formula_on_extracted_features(tmp_path, capsys):
    a, b = random_images(200, seed=1), random_images(150, seed=2) // 2  # different distributions
    result, _ = run_cli(["--samples", write_npz(tmp_path / "a.npz", a), "--ref", write_npz(tmp_path / "b.npz", b),
                         "--batch-size", "32", "--device", "cpu"], capsys)
    fa, fb = a.reshape(200, -1) / 255, b.reshape(150, -1) / 255
    expected = scipy_fid(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    logits = fa @ PixelFeatures().weight.double().numpy() * 10
    assert result["inception_score"] == pytest.approx(inception_score(logits)[0], rel=1e-5)
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1


def test_cli_statistics_reference(tmp_path, capsys):
    a, b = random_images(100, seed=3), random_images(120, seed=4)
    samples, ref_images = write_npz(tmp_path / "a.npz", a), write_npz(tmp_path / "b.npz", b)
    stats = str(tmp_path / "b_stats.npz")
    run_cli(["--samples", ref_images, "--save-stats", stats, "--device", "cpu"], capsys)
    with np.load(stats) as data:
        assert set(data.files) == {"mu", "sigma", "mu_s", "sigma_s", "extractor", "count"}
    from_images, _ = run_cli(["--samples", samples, "--ref", ref_images, "--device", "cpu"], capsys)
    from_stats, _ = run_cli(["--samples", samples, "--ref", stats, "--device", "cpu"], capsys)
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-12)
    assert from_stats["sfid"] == pytest.approx(from_images["sfid"], rel=1e-12)
    assert from_stats["precision"] is None and from_stats["recall"] is None  # needs reference images
    assert from_stats["num_ref"] == 120


def test_cli_prefers_stored_statistics_like_adm(tmp_path, capsys):
    """ADM reference batches hold images (for precision/recall) and full-dataset statistics."""
    a, b = random_images(80, seed=5), random_images(90, seed=6)
    mu, sigma = np.full(12, 0.3), np.eye(12) * 0.02
    ref = write_npz(tmp_path / "ref.npz", b, mu=mu, sigma=sigma)
    result, _ = run_cli(["--samples", write_npz(tmp_path / "a.npz", a), "--ref", ref, "--device", "cpu"], capsys)
    fa = a.reshape(80, -1) / 255
    assert result["fid"] == pytest.approx(scipy_fid(fa.mean(0), np.cov(fa, rowvar=False), mu, sigma), rel=1e-6)
    assert result["precision"] is not None
    recomputed, _ = run_cli(["--samples", str(tmp_path / "a.npz"), "--ref", ref, "--device", "cpu",
                             "--recompute-ref-stats"], capsys)
    fb = b.reshape(90, -1) / 255
    expected = scipy_fid(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert recomputed["fid"] == pytest.approx(expected, rel=1e-6)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    good = write_npz(tmp_path / "good.npz", random_images(10, seed=7))
    bad = write_npz(tmp_path / "bad.npz", np.zeros((4, 2, 2, 3), np.float32))
    cases = [
        (["--samples", str(tmp_path / "missing.npz"), "--ref", good], "samples not found"),
        (["--samples", bad, "--ref", good], "arr_0 must be uint8 [N, H, W, 3]"),
        (["--samples", good, "--ref", str(tmp_path / "nope.npz")], "reference not found"),
    ]
    np.savez(tmp_path / "other.npz", mu=np.zeros(12), sigma=np.eye(12), extractor=np.array("inception-2015-12-05"))
    cases.append((["--samples", good, "--ref", str(tmp_path / "other.npz")], "computed with 'inception-2015-12-05'"))
    np.savez(tmp_path / "dims.npz", mu=np.zeros(5), sigma=np.eye(5))
    cases.append((["--samples", good, "--ref", str(tmp_path / "dims.npz")], "statistics have 5 dimensions"))
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main([*args, "--device", "cpu"], extractor=PixelFeatures())
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Inception network and .npz streaming
# --------------------------------------------------------------------------------------------


def test_tf1_bilinear_resize_hand_computed():
    x = torch.tensor([[[[0.0, 10.0]]]])  # [1, 1, 1, 2] -> width 4 samples at 0, 0.5, 1, 1.5
    out = resize_bilinear_tf1(x.expand(1, 1, 2, 2).contiguous(), 4)
    assert out[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]
    assert torch.equal(out[0, 0, 0], out[0, 0, 3])  # rows are constant along H here


@pytest.mark.slow  # ~6 GFLOP per image on CPU
def test_inception_loads_local_weights_and_gives_adm_feature_shapes(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "inception_random.pth"
    torch.save(InceptionV3().state_dict(), weights)
    model = load_inception(weights)
    out = model(torch.from_numpy(random_images(1, seed=8, size=16)))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"pool": (1, 2048), "spatial": (1, 2023), "logits": (1, 1008)}
    torch.testing.assert_close(out["logits"], out["pool"] @ model.fc.weight.T)  # no bias (ADM's IS logits)
    # The CLI reaches the same network through --inception.
    images = write_npz(tmp_path / "s.npz", random_images(2, seed=9, size=8))
    result = evaluate.main(["--samples", images, "--save-stats", str(tmp_path / "stats.npz"),
                            "--inception", str(weights), "--device", "cpu"])
    assert result["feature_extractor"] == "inception-2015-12-05"
    with np.load(tmp_path / "stats.npz") as stats:
        assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
        assert stats["mu_s"].shape == (2023,) and str(stats["extractor"]) == "inception-2015-12-05"


def test_inception_rejects_wrong_files(tmp_path):
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, tmp_path / "torchvision.pth")
    with pytest.raises(ValueError, match="torchvision.pth: not the FID Inception state dict"):
        load_inception(tmp_path / "torchvision.pth")
    (tmp_path / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="does not match the 6726825d in its name"):
        load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        load_inception(tmp_path / "absent.pth")


def test_npz_writer_streams_an_adm_batch(tmp_path):
    images, labels = random_images(25, seed=10, size=4), np.arange(25) % 7
    with NpzWriter(tmp_path / "x.npz") as npz:
        stream = npz.begin("arr_0", images.shape, np.uint8)
        for start in range(0, 25, 8):
            stream.write(images[start:start + 8])
        npz.add("arr_1", labels)
    with np.load(tmp_path / "x.npz") as data:
        assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], labels)
    assert [len(b) for b in iter_npz_rows(tmp_path / "x.npz", batch_size=10)] == [10, 10, 5]
    with pytest.raises(ValueError, match="3 rows written, 25 announced"):
        with NpzWriter(tmp_path / "y.npz") as npz:
            npz.begin("arr_0", images.shape, np.uint8).write(images[:3])
            npz.add("arr_1", labels)
    assert not (tmp_path / "y.npz").exists() and not (tmp_path / "y.npz.partial").exists()
