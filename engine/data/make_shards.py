"""Convert image datasets into indexed webdataset shards (docs/data.md).

    python -m engine.data.make_shards imagenet --src train/ --out shards/ --vae VAE_DIR --image-size 256 --shard-size 1000 [--workers K]
    python -m engine.data.make_shards imagenet --src train/ --out shards/ --no-vae --image-size 256 --shard-size 1000
    python -m engine.data.make_shards captions --src FOLDER_OR.jsonl --out shards/ [--vae DIR] [--text-encoder DIR]
    python -m engine.data.make_shards index --shards DIR      # index webdataset shards made elsewhere

Run it again to resume; run it under srun/torchrun (RANK/WORLD_SIZE) to split the shards over ranks.
Only rank 0 walks --src: it writes the numbered listing to OUT/listing.jsonl, which the other ranks
(and every rerun into the same --out) read instead of listing the source tree again.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.data.convert import EncodeSettings, Item, convert, dist_env
from engine.data.images import is_image_file
from engine.data.shards import DataError, atomic_write_text, index_shard, write_index

LISTING_SEED = 0  # inputs are shuffled once, so every shard mixes classes (matters for data.order=stream)
LISTING_FILE = "listing.jsonl"  # header line, then one numbered Item per line in key order
LISTING_POLL_S = 1.0
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


@dataclasses.dataclass
class Listing:
    """What rank 0 found under --src: numbered items, inputs left out, class folder names (imagenet)."""

    kind: str
    src: str
    items: list[Item]
    skipped: list[dict]
    classes: list[str]


def take_listing(kind: str, src: Path) -> Listing:
    """Walk --src (the only walk of the conversion) and number the items."""
    classes: list[str] = []
    if kind == "imagenet":
        classes, items = list_imagenet(src)
        skipped: list[dict] = []
    elif src.is_file():
        items, skipped = list_caption_jsonl(src)
    elif src.is_dir():
        items, skipped = list_caption_folder(src)
    else:
        raise DataError(f"--src {src}: neither a folder nor a JSONL file")
    return Listing(kind, str(src.resolve()), number_items(items), skipped, classes)


def write_listing(path: Path, listing: Listing) -> None:
    header = {"kind": listing.kind, "src": listing.src, "count": len(listing.items),
              "skipped": listing.skipped, "classes": listing.classes}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:  # streamed: a listing can hold 100M lines
        f.write(json.dumps(header) + "\n")
        for item in listing.items:
            f.write(json.dumps(dataclasses.asdict(item)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # complete or absent: the other ranks wait for this name


def read_listing(path: Path, kind: str, src: Path) -> Listing:
    with open(path, encoding="utf-8") as f:
        header = json.loads(f.readline())
        if (header["kind"], header["src"]) != (kind, str(src.resolve())):
            raise DataError(f"{path} lists `{header['kind']} --src {header['src']}`, not `{kind} --src {src}`: "
                            "use another --out, or delete the folder to convert another source")
        items = [Item(**json.loads(line)) for line in f]
    if len(items) != header["count"]:
        raise DataError(f"{path}: {len(items)} items, its header says {header['count']}; delete it and rerun")
    return Listing(kind, header["src"], items, header["skipped"], header["classes"])


def shared_listing(kind: str, src: Path, out: Path, rank: int, wait_s: float) -> Listing:
    """The listing of this conversion: read from OUT/listing.jsonl if there; else rank 0 walks --src
    and writes it while the other ranks wait for it (at most `wait_s` seconds)."""
    path = out / LISTING_FILE
    if rank == 0 and not path.exists():
        listing = take_listing(kind, src)
        out.mkdir(parents=True, exist_ok=True)
        write_listing(path, listing)
        return listing
    deadline = time.monotonic() + wait_s
    if not path.exists():
        log.warning("rank %d: waiting for rank 0 to list --src into %s", rank, path)
    while not path.exists():
        if time.monotonic() > deadline:
            raise DataError(f"rank {rank}: no {path} after {wait_s:.0f} s (--listing-wait): rank 0 lists --src "
                            "and writes it; did rank 0 fail or get another --out?")
        time.sleep(LISTING_POLL_S)
    return read_listing(path, kind, src)


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
    parser.add_argument("--listing-wait", type=float, default=7200,
                        help="seconds ranks > 0 wait for rank 0's listing of --src (default 7200)")


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
    rank = dist_env()[0]
    listing = shared_listing(args.command, args.src, args.out, rank, args.listing_wait)
    if args.command == "imagenet":
        meta = {"kind": "imagenet", "num_classes": len(listing.classes), "classes": "classes.json"}
        if rank == 0:
            atomic_write_text(args.out / "classes.json",
                              json.dumps({name: i for i, name in enumerate(listing.classes)}, indent=1))
        vae, text_encoder, store_image = args.vae or "", "", bool(args.no_vae)
    else:
        for entry in listing.skipped:
            log.warning("skipping %s (%s)", entry["path"], entry["error"])
        meta = {"kind": "captions"}
        vae, text_encoder, store_image = args.vae, args.text_encoder, True
    settings = EncodeSettings(args.image_size, args.image_format, store_image, vae, text_encoder,
                              getattr(args, "max_length", 0), args.batch_size, args.device)
    return convert(listing.items, args.out, args.shard_size, settings, args.workers, meta, listing.skipped)


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
