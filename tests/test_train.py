"""engine/train.py end to end in real processes: run directory, metrics, guards, world-size equivalence."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.config import load_config, to_dict
from engine.digits_eval import ReferenceClassifier, as_model_pixels
from engine.data import load_digits_split
from tests.checkpoint_utils import whole_tensors
from tests.train_utils import QUICKSTART, TINY, losses_by_step, read_metrics, run_train

REQUIRED = {"step", "loss", "lr", "grad_norm", "samples_per_sec", "tokens_per_sec", "tflops_per_device",
            "nonfinite_steps", "diffusion_loss", "aux_loss"}


def test_short_run_writes_run_directory(tmp_path):
    run = tmp_path / "run"
    overrides = TINY + [f"train.output_dir={run}", "train.max_steps=4", "train.log_every=2", "train.save_every=2",
                        "train.sample_every=4", "eval.num_samples=20", "eval.batch_size=8"]
    proc = run_train(QUICKSTART, overrides)
    assert "step 4/4" in proc.stdout and "Traceback" not in proc.stderr

    records = read_metrics(run)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4]
    for r in train_records:
        assert REQUIRED <= r.keys(), REQUIRED - r.keys()
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["samples_per_sec"] > 0 and r["nonfinite_steps"] == 0
        assert any(k.startswith("loss_by_t/") for k in r) and "memory/peak_rss_gb" in r and r["data/epoch"] > 0
    evals = [r for r in records if "eval/class_acc" in r]
    assert len(evals) == 1 and evals[0]["step"] == 4 and 0 <= evals[0]["eval/class_acc"] <= 1

    events = EventAccumulator(str(run / "tb")).Reload()
    tags = events.Tags()
    assert {"loss", "lr", "grad_norm", "samples_per_sec", "eval/class_acc"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [2, 4] and "samples/ema" in tags["images"]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_0000002", "step_0000004"]
    assert (ckpts / "latest").read_text().strip() == "step_0000004"
    grid = Image.open(run / "samples" / "step_0000004.png")
    assert grid.size[0] > 8 * 32 and grid.mode == "RGB"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved == to_dict(load_config(QUICKSTART, overrides))


def test_fresh_run_refuses_a_folder_with_checkpoints_resume_reports_done(tmp_path):
    run = tmp_path / "run"
    run_train(QUICKSTART, TINY + [f"train.output_dir={run}", "train.max_steps=1"])
    before = read_metrics(run)
    proc = run_train(QUICKSTART, TINY + [f"train.output_dir={run}", "train.max_steps=1"], check=False)
    assert proc.returncode == 2 and "train.resume=auto" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_train(QUICKSTART, TINY + [f"train.output_dir={run}", "train.max_steps=1", "train.resume=auto"])
    assert "already trained to step 1" in proc.stdout and read_metrics(run) == before


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    """lr 1e30: the first update blows the weights up, every later loss overflows; those updates are
    skipped and counted, and max_nonfinite_steps in a row stop the run naming the last checkpoint."""
    run = tmp_path / "run"
    proc = run_train(QUICKSTART, TINY + [f"train.output_dir={run}", "train.lr=1e30", "train.max_steps=10",
                                         "train.save_every=1", "train.max_nonfinite_steps=2"], check=False)
    assert proc.returncode == 1, proc.stderr
    message = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "2 steps in a row had a non-finite loss or gradient" in message[0]
    assert "step_0000001" in message[0]  # the last checkpoint written before the trouble
    records = read_metrics(run)
    assert records[0]["nonfinite_steps"] == 0 and np.isfinite(records[0]["loss"])
    assert records[-1]["step"] == 3 and records[-1]["nonfinite_steps_total"] == 2


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_loss_curve(tmp_path):
    """The same global batch of 8 on 1 process, on 2 DeepSpeed ranks (ZeRO-2) and on 2 torchrun
    ranks (ZeRO-1, micro-batch 2 x accumulation 2): equal per-step losses."""
    common = TINY + ["train.max_steps=4", "train.lr=1e-3", "eval.num_samples=30", "eval.batch_size=4",
                     "train.save_every=1", "train.ema_decay=0.5"]
    one = tmp_path / "one"
    run_train(QUICKSTART, common + [f"train.output_dir={one}"])
    reference = losses_by_step(one)
    assert list(reference) == [1, 2, 3, 4] and reference[4] < reference[1]
    layouts = {
        "ds2": (2, "deepspeed", ["parallel.zero_stage=2"]),
        "torchrun2": (2, "torchrun", ["parallel.zero_stage=1", "train.micro_batch_size=2"]),
    }
    for name, (nproc, launcher, extra) in layouts.items():
        run_train(QUICKSTART, common + extra + [f"train.output_dir={tmp_path / name}"], nproc=nproc, launcher=launcher)
        losses = losses_by_step(tmp_path / name)
        assert losses.keys() == reference.keys(), name
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, rel=1e-5), (name, step)
        # evaluation samples are seeded per sample: the same images, hence the same score
        assert class_acc(tmp_path / name) == class_acc(one)
        assert_ema_tracks_full_weights(tmp_path / name, decay=0.5)


def assert_ema_tracks_full_weights(run, decay: float) -> None:
    """Under ZeRO each rank updates a partition; the EMA must follow the whole, gathered weights:
    ema(4) = d ema(3) + (1 - d) w(4) for every tensor, w(4) being the saved fp32 weights."""
    before = whole_tensors(run / "checkpoints" / "step_0000003")
    after = whole_tensors(run / "checkpoints" / "step_0000004")
    names = [k[len("ema/"):] for k in after if k.startswith("ema/")]
    assert names
    for name in names:
        expected = decay * before[f"ema/{name}"] + (1 - decay) * after[f"model/{name}"]
        torch.testing.assert_close(after[f"ema/{name}"], expected, rtol=1e-6, atol=1e-7)


def class_acc(run) -> float:
    return [r["eval/class_acc"] for r in read_metrics(run) if "eval/class_acc" in r][-1]


def test_reference_classifier_recognises_real_digits():
    """The ceiling of eval/class_acc: real training-split digits (never seen by the classifier)."""
    cfg = load_config(QUICKSTART)
    classifier = ReferenceClassifier.fit(cfg)
    images, labels = load_digits_split("train")
    accuracy = float((classifier.predict(as_model_pixels(images, cfg.model.input_size)) == labels).mean())
    assert accuracy > 0.95
