"""Convert image datasets into indexed webdataset shards (docs/data.md).

    python -m engine.data.make_shards imagenet --src train/ --out shards/ --vae VAE_DIR --image-size 256 --shard-size 1000 [--workers K]
    python -m engine.data.make_shards imagenet --src train/ --out shards/ --no-vae --image-size 256 --shard-size 1000
    python -m engine.data.make_shards captions --src FOLDER_OR.jsonl --out shards/ [--vae DIR] [--text-encoder DIR]
    python -m engine.data.make_shards index --shards DIR      # index webdataset shards made elsewhere

Run it again to resume; run it under srun/torchrun (RANK/WORLD_SIZE) to split the shards over ranks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.data.convert import EncodeSettings, Item, convert, dist_env
from engine.data.images import is_image_file
from engine.data.shards import DataError, atomic_write_text, index_shard, write_index

LISTING_SEED = 0  # inputs are shuffled once, so every shard mixes classes (matters for data.order=stream)
log = logging.getLogger("engine.data.make_shards")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def list_imagenet(src: Path) -> tuple[list[str], list[Item]]:
    """Class folders (sorted names -> indices 0..K-1, as torchvision's ImageFolder) and their images."""
    if not src.is_dir():
        raise DataError(f"--src {src}: not a folder")
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"--src {src}: no class folder (expected {src}/<class>/<image>)")
    items = [Item(-1, str(path), str(path.relative_to(src)), label=label)
             for label, name in enumerate(classes) for path in _image_files(src / name)]
    return classes, items


def list_caption_folder(src: Path) -> tuple[list[Item], list[dict]]:
    """Images with a caption file of the same name (`a.jpg` + `a.txt`); an image without one is skipped."""
    items, skipped = [], []
    for path in _image_files(src):
        caption = path.with_suffix(".txt")
        if caption.is_file():
            items.append(Item(-1, str(path), str(path.relative_to(src)), caption_file=str(caption)))
        else:
            skipped.append({"path": str(path.relative_to(src)), "error": f"no caption file {caption.name}"})
    return items, skipped


def list_caption_jsonl(src: Path) -> tuple[list[Item], list[dict]]:
    """Lines {"path": image (relative to the file's folder or absolute), "caption": text}."""
    items, skipped = [], []
    for number, line in enumerate(src.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            path, caption = record["path"], record["caption"]
            if not isinstance(path, str) or not isinstance(caption, str):
                raise ValueError("path and caption must be strings")
        except (ValueError, KeyError, TypeError) as e:
            skipped.append({"path": f"{src}:{number}", "error": f"bad line ({type(e).__name__}: {e})"})
            continue
        items.append(Item(-1, str(src.parent / path), path, caption=caption))
    return items, skipped


def number_items(items: list[Item]) -> list[Item]:
    """Shuffle the sorted listing with a fixed seed and number it: item n becomes key n."""
    order = np.random.default_rng(LISTING_SEED).permutation(len(items))
    return [dataclasses.replace(items[i], number=n) for n, i in enumerate(order)]


def index_existing(root: Path) -> dict:
    """Sidecars and index.json for webdataset shards written by other tools."""
    names = sorted(p.name for p in root.glob("*.tar"))
    if not names:
        raise DataError(f"--shards {root}: no *.tar file")
    members: set[str] | None = None
    for name in tqdm(names, desc="indexing shards", unit="shard"):
        sidecar = index_shard(root / name)
        members = set(sidecar["members"]) if members is None else members & set(sidecar["members"])
    kind = "captions" if "txt" in members else "imagenet" if "cls" in members else "unlabelled"
    return write_index(root, names, {"kind": kind})


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=256, help="side of the ADM centre crop (default 256)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="processes of this rank (default 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE / text-encoder call")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if CUDA, else cpu), cpu, cuda:N")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png",
                        help="stored images: png (lossless, default) or jpg (quality 95, smaller)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.data.make_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imagenet = sub.add_parser("imagenet", help="class folders SRC/<class>/<image> -> latents (or crops) + class")
    _common(imagenet)
    mode = imagenet.add_mutually_exclusive_group(required=True)
    mode.add_argument("--vae", help="local diffusers AutoencoderKL folder: store latents of each image and its flip")
    mode.add_argument("--no-vae", action="store_true", help="store the cropped images (encode on the fly)")
    captions = sub.add_parser("captions", help="image + caption pairs (a folder of a.jpg + a.txt, or a JSONL)")
    _common(captions)
    captions.add_argument("--vae", default="", help="also store latents of each image and its flip")
    captions.add_argument("--text-encoder", default="", help="local transformers CLIP/T5 folder: store embeddings")
    captions.add_argument("--max-length", type=int, default=77, help="tokens per caption for --text-encoder")
    index = sub.add_parser("index", help="index webdataset shards written by other tools")
    index.add_argument("--shards", type=Path, required=True)
    return parser


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _summary(index: dict | None, out: Path) -> None:
    if index is None:
        return
    print(f"{out}: {index['num_samples']} samples in {len(index['shards'])} shards", file=sys.stderr)
    if index["skipped"]:
        print(f"skipped {len(index['skipped'])} inputs (all listed in {out / 'index.json'}):", file=sys.stderr)
        for entry in index["skipped"][:50]:
            print(f"  {entry['path']}: {entry['error']}", file=sys.stderr)


def run(args: argparse.Namespace) -> dict | None:
    if args.command == "index":
        return index_existing(args.shards)
    if args.command == "imagenet":
        classes, items = list_imagenet(args.src)
        listing_skipped: list[dict] = []
        meta = {"kind": "imagenet", "num_classes": len(classes), "classes": "classes.json"}
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "classes.json", json.dumps({name: i for i, name in enumerate(classes)}, indent=1))
        vae, text_encoder, store_image = args.vae or "", "", bool(args.no_vae)
    else:
        if args.src.is_file():
            items, listing_skipped = list_caption_jsonl(args.src)
        elif args.src.is_dir():
            items, listing_skipped = list_caption_folder(args.src)
        else:
            raise DataError(f"--src {args.src}: neither a folder nor a JSONL file")
        for entry in listing_skipped:
            log.warning("skipping %s (%s)", entry["path"], entry["error"])
        meta = {"kind": "captions"}
        vae, text_encoder, store_image = args.vae, args.text_encoder, True
    settings = EncodeSettings(args.image_size, args.image_format, store_image, vae, text_encoder,
                              getattr(args, "max_length", 0), args.batch_size, args.device)
    return convert(number_items(items), args.out, args.shard_size, settings, args.workers, meta, listing_skipped)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("make_shards: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if dist_env()[0] == 0 else logging.WARNING)
    log.propagate = False
    try:
        index = run(args)
    except DataError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    _summary(index, args.shards if args.command == "index" else args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
