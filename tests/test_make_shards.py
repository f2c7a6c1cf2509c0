"""The shard converters on a generated ImageFolder, a tiny random AutoencoderKL and tiny text encoders.

Nothing is downloaded: the VAE, CLIP/T5 text models and the tokenizer are built from configs and
saved to temporary folders, as a user's local model folders would be.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from engine.config import load_config
from engine.data import build_train_loader
from engine.data.make_shards import main
from engine.data.shards import ShardIndex, ShardReader

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
WORDS = ["[PAD]", "[UNK]", "</s>", "a", "photo", "of", "cat", "dog", "red", "blue"]


def run_main(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def all_samples(root: Path) -> list[dict]:
    reader = ShardReader(ShardIndex(root))
    return [reader.read(i) for i in range(reader.index.num_samples)]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae")
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=SIZE).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """3 classes x 3 JPEGs of assorted shapes, plus one corrupt JPEG; returns (src, {relpath: class})."""
    src, rng, good = tmp_path_factory.mktemp("imagefolder"), np.random.default_rng(0), {}
    for name, shapes in (("n02_cat", [(20, 28), (30, 18), (40, 40)]), ("n01_dog", [(16, 16), (24, 20), (19, 33)]),
                         ("n03_fox", [(50, 70), (17, 17), (22, 26)])):
        (src / name).mkdir()
        for i, shape in enumerate(shapes):
            PIL.Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(src / name / f"{name}_{i}.JPEG")
            good[f"{name}/{name}_{i}.JPEG"] = name
    (src / "n01_dog" / "n01_dog_broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF truncated")
    return src, good


@pytest.fixture(scope="module")
def imagenet_out(tmp_path_factory, image_folder, vae_dir) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("imagenet_shards")
    code, err = run_main("imagenet", "--src", image_folder[0], "--out", out, "--vae", vae_dir,
                         "--image-size", SIZE, "--shard-size", 4, "--batch-size", 3)
    assert code == 0, err
    return out, err


def test_every_good_image_lands_once_and_the_bad_one_is_named(imagenet_out, image_folder) -> None:
    out, err = imagenet_out
    _, good = image_folder
    classes = json.loads((out / "classes.json").read_text())
    assert classes == {"n01_dog": 0, "n02_cat": 1, "n03_fox": 2}  # sorted folder names
    samples = all_samples(out)
    sources = [json.loads(s["json"])["source"] for s in samples]
    assert sorted(sources) == sorted(good)
    assert all(int(s["cls"]) == classes[good[src]] for s, src in zip(samples, sources))
    assert "n01_dog/n01_dog_broken.JPEG" in err
    index = json.loads((out / "index.json").read_text())
    assert [e["path"] for e in index["skipped"]] == ["n01_dog/n01_dog_broken.JPEG"]
    assert index["num_samples"] == 9 and len(index["shards"]) == 3  # 10 inputs in shards of 4
    assert index["latent"]["scaling_factor"] == pytest.approx(0.18215) and index["num_classes"] == 3


def test_latents_are_the_vae_posterior_of_the_adm_crop_and_of_its_flip(imagenet_out, image_folder, vae_dir) -> None:
    from diffusers import AutoencoderKL

    out, _ = imagenet_out
    src, _ = image_folder
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    sample = next(s for s in all_samples(out) if json.loads(s["json"])["source"] == "n02_cat/n02_cat_0.JPEG")
    # ADM crop of a 20x28 (h x w) image to 16: no halving (20 < 32), short side to 16 -> 16x22, centre 16 columns
    image = PIL.Image.open(src / "n02_cat" / "n02_cat_0.JPEG").convert("RGB")
    crop = np.asarray(image.resize((22, 16), resample=PIL.Image.BICUBIC))[:, 3:19]
    pixels = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    noise = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(int(sample["__key__"])))
    stored = torch.from_numpy(np.load(io.BytesIO(sample["latent.npy"])).astype(np.float32))
    assert stored.shape == (2, 4, SIZE // 2, SIZE // 2)
    with torch.no_grad():
        for flip, x in enumerate((pixels, pixels.flip(-1))):
            posterior = vae.encode(x).latent_dist
            expected = (posterior.mean + posterior.std * noise[flip]) * 0.18215
            torch.testing.assert_close(stored[flip], expected[0], atol=2e-3, rtol=2e-3)


def test_rerun_redoes_only_missing_shards_and_ranks_split_the_work(imagenet_out, image_folder, vae_dir,
                                                                   tmp_path, monkeypatch) -> None:
    out, _ = imagenet_out
    args = ["imagenet", "--src", image_folder[0], "--vae", vae_dir, "--image-size", SIZE, "--shard-size", 4]
    names = [f"shard-00000{i}.tar" for i in range(3)]
    original = {n: (out / n).read_bytes() for n in names}
    stamps = {n: (out / n).stat().st_mtime_ns for n in names}
    (out / names[1]).unlink()
    code, err = run_main(*args, "--out", out)
    assert code == 0, err
    assert all((out / n).stat().st_mtime_ns == stamps[n] for n in (names[0], names[2]))  # not redone
    assert {n: (out / n).read_bytes() for n in names} == original  # the redone shard is byte-identical

    split = tmp_path / "split"
    for rank in (0, 1):  # two ranks (as under srun/torchrun) each write their share: shards j % 2 == rank
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        code, err = run_main(*args, "--out", split)
        assert code == 0, err
        assert (split / "index.json").exists() == (rank == 1)  # written by the rank finishing last
    assert {n: (split / n).read_bytes() for n in names} == original

    code, err = run_main(*[a if a != 4 else 3 for a in args], "--out", out)
    assert code == 2 and "shard_size" in err  # a changed conversion is refused, not mixed in


def test_only_rank_0_walks_the_source_tree(imagenet_out, image_folder, vae_dir, tmp_path, monkeypatch) -> None:
    """Ranks > 0 (and reruns) read OUT/listing.jsonl: no directory listing under --src."""
    src = image_folder[0]
    listed: dict[int, list[str]] = {0: [], 1: []}
    rank = [0]
    for name in ("scandir", "listdir", "walk"):
        real = getattr(os, name)

        def counting(path=".", *args, _real=real, **kwargs):
            if str(Path(os.fspath(path)).resolve()).startswith(str(src.resolve())):
                listed[rank[0]].append(os.fspath(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, counting)
    out = tmp_path / "split"
    args = ["imagenet", "--src", src, "--vae", vae_dir, "--image-size", SIZE, "--shard-size", 4, "--out", out]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank[0] in (0, 1):
        monkeypatch.setenv("RANK", str(rank[0]))
        code, err = run_main(*args)
        assert code == 0, err
    assert listed[0] and not listed[1]  # rank 0 walked the 3 class folders; rank 1 did not list anything
    reference = {n: (imagenet_out[0] / n).read_bytes() for n in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar")}
    assert {n: (out / n).read_bytes() for n in reference} == reference  # same shards as one rank alone
    listed[0].clear()
    for shard in reference:  # a rerun of rank 0 redoes missing shards from the listing, without walking
        (out / shard).unlink()
    rank[0] = 0
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert run_main(*args)[0] == 0 and listed[0] == []
    assert {n: (out / n).read_bytes() for n in reference} == reference


def test_a_rank_waiting_for_the_listing_gives_up_with_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = run_main("imagenet", "--src", tmp_path, "--out", tmp_path / "out", "--no-vae", "--listing-wait", 0)
    assert code == 2 and "listing.jsonl" in err and "rank 0" in err


@pytest.mark.slow
def test_worker_processes_write_the_same_shards(imagenet_out, image_folder, vae_dir, tmp_path) -> None:
    out, _ = imagenet_out
    code, err = run_main("imagenet", "--src", image_folder[0], "--out", tmp_path, "--vae", vae_dir,
                         "--image-size", SIZE, "--shard-size", 4, "--workers", 2)
    assert code == 0, err
    for a, b in zip(all_samples(out), all_samples(tmp_path), strict=True):
        assert a["__key__"] == b["__key__"] and a["json"] == b["json"] and a["cls"] == b["cls"]
        np.testing.assert_allclose(np.load(io.BytesIO(a["latent.npy"])), np.load(io.BytesIO(b["latent.npy"])), atol=1e-3)


def test_no_vae_command_line_stores_crops_the_loader_reads(image_folder, tmp_path) -> None:
    src, good = image_folder
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "engine.data.make_shards", "imagenet", "--src", str(src),
                           "--out", str(tmp_path), "--no-vae", "--image-size", str(SIZE), "--shard-size", "4"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "n01_dog_broken.JPEG" in proc.stderr
    samples = all_samples(tmp_path)
    assert len(samples) == len(good) and all(PIL.Image.open(io.BytesIO(s["png"])).size == (SIZE, SIZE) for s in samples)
    cfg = load_config(None, ["data.source=imagenet", f"data.shards={tmp_path}", "model.in_channels=3",
                             f"model.input_size={SIZE}", "model.num_classes=3", "train.global_batch_size=3",
                             "data.num_workers=0"])
    batch = next(iter(build_train_loader(cfg, 0, 1, 3, 1, 0)))[0]
    assert batch["x"].shape == (3, 3, SIZE, SIZE) and -1 <= batch["x"].min() and batch["x"].max() <= 1
    usage = subprocess.run([sys.executable, "-m", "engine.data.make_shards", "imagenet", "--src", str(src),
                            "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=300)
    assert usage.returncode == 2 and "--vae" in usage.stderr  # one of --vae / --no-vae is required


def _text_model(path: Path, kind: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token="</s>").save_pretrained(path)
    if kind == "clip":
        CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=32, eos_token_id=2,
                                     bos_token_id=0, pad_token_id=0)).save_pretrained(path)
    else:
        T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)).save_pretrained(path)
    return path


def _image(path: Path, seed: int) -> None:
    array = np.random.default_rng(seed).integers(0, 256, (18 + seed, 24, 3), dtype=np.uint8)
    PIL.Image.fromarray(array).save(path)


@pytest.mark.parametrize("form, encoder", [("folder", "clip"), ("jsonl", "t5")])
def test_captions_converter_both_input_forms(form: str, encoder: str, tmp_path: Path, vae_dir: Path) -> None:
    captions = {"one": "a photo of a cat", "two": "a red dog", "three": "blue"}
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for i, (name, text) in enumerate(captions.items()):
        _image(data / "sub" / f"{name}.jpg", i)
        if form == "folder":
            (data / "sub" / f"{name}.txt").write_text(text + "\n")
    if form == "folder":
        _image(data / "orphan.png", 9)  # no caption file: skipped and named
        src, expected_skips = data, ["orphan.png"]
    else:
        lines = [json.dumps({"path": f"sub/{n}.jpg", "caption": t}) for n, t in captions.items()]
        lines += ["{not json", json.dumps({"path": "sub/missing.jpg", "caption": "a cat"})]
        src = data / "pairs.jsonl"
        src.write_text("\n".join(lines) + "\n")
        expected_skips = [f"{src}:4", "sub/missing.jpg"]
    out = tmp_path / "shards"
    extra = ["--vae", vae_dir] if form == "jsonl" else []
    code, err = run_main("captions", "--src", src, "--out", out, "--image-size", SIZE, "--shard-size", 2,
                         "--text-encoder", _text_model(tmp_path / encoder, encoder), "--max-length", 8, *extra)
    assert code == 0, err
    index = json.loads((out / "index.json").read_text())
    assert sorted(e["path"] for e in index["skipped"]) == sorted(expected_skips)
    assert all(s in err for s in expected_skips)
    samples = all_samples(out)
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    assert {k.split("/")[-1]: v["txt"].decode() for k, v in by_source.items()} == {f"{n}.jpg": t for n, t in captions.items()}
    for s in samples:
        tokens = np.load(io.BytesIO(s["text_emb.npy"]))
        assert tokens.shape == (len(s["txt"].decode().split()), 16) and np.load(io.BytesIO(s["text_pooled.npy"])).shape == (16,)
    assert ("latent.npy" in samples[0]) == (form == "jsonl") and "png" in samples[0]

    cfg = load_config(None, ["data.source=captions", f"data.shards={out}", "model.in_channels=3",
                             f"model.input_size={SIZE}", "model.text.precomputed=true", "model.text.max_length=8",
                             "train.global_batch_size=3", "data.num_workers=0"])
    batch = next(iter(build_train_loader(cfg, 0, 1, 3, 1, 0)))[0]
    assert sorted(batch["caption"]) == sorted(captions.values())
    assert batch["text_emb"].shape == (3, 8, 16) and batch["text_pooled"].shape == (3, 16)
    assert batch["text_mask"].sum(1).tolist() == [len(c.split()) for c in batch["caption"]]


@pytest.mark.slow
def test_training_runs_on_the_converted_latent_shards(imagenet_out, tmp_path) -> None:
    from tests.train_utils import QUICKSTART, TINY, losses_by_step, run_train

    out, _ = imagenet_out
    run_train(QUICKSTART, TINY + [f"train.output_dir={tmp_path}", "data.source=imagenet", f"data.shards={out}",
                                  "data.latent=true", "data.random_flip=true", "model.in_channels=4",
                                  f"model.input_size={SIZE // 2}", "model.num_classes=3"])
    losses = losses_by_step(tmp_path)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
