"""Training epoch time: decoding the original photos every epoch vs reading the resized cache, same run.

Usage: .venv/bin/python bench/train.py [--dataset ../shared/data/ikea_products] [--limit 128] [--big 4000x3000]

Both arms run the same fastai epoch (the finetune mode's frozen phase: Lite0 body frozen with its
BatchNorm in eval mode, `train_bn=False`, batch 32, default augmentations, one-cycle) over the same photos;
only where the pixels come from differs:

- baseline "full decode": the original decoded at full resolution, then resized (what fastai's stock
  `PILImage.create` + `Resize(224)` does), every epoch;
- baseline "draft decode": `loop.data.images.load_model_input(original, 224)` every epoch (JPEG draft, i.e.
  DCT-domain downscale, + EXIF transpose);
- project: the lossless 224 px PNG that `loop.data.resized.ensure_resized` wrote once (its one-off cost is
  printed too).

Run twice: on the photos as they are (ikea_products are 500x500 JPEGs, cheap to decode), and on copies
upscaled to `--big` (default 4000x3000, what a phone produces) with added grain, written to a temp
folder — synthetic in resolution and file size, real in content.
Caveat: on 2 shared cores timings vary 20-30% between runs; trust the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from loop.data.images import load_model_input, resize_and_crop, to_rgb
from loop.data.resized import ensure_resized, resized_path
from loop.model.backbones import create_network, get_backbone
from loop.workspace import init_workspace

SIZE = 224


def one_epoch(ws, files: list[Path], labels: list[str], loader) -> float:
    """Seconds for one fastai training epoch where `loader(path) -> uint8 (224, 224, 3)` gives the pixels."""
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        Learner,
        Normalize,
        PILImage,
        RandomSplitter,
        TransformBlock,
        aug_transforms,
        set_seed,
    )
    from fastai.vision.all import ProgressCallback as FastaiProgress
    from fastai.vision.core import IntToFloatTensor

    set_seed(0)
    backbone = get_backbone("tf_efficientnet_lite0")
    classes = sorted(set(labels))
    frame = pd.DataFrame({"file": [str(f) for f in files], "label": labels})
    block = DataBlock(
        blocks=(TransformBlock(type_tfms=[lambda p: PILImage.create(loader(Path(p)))], batch_tfms=IntToFloatTensor),
                CategoryBlock(vocab=classes)),
        get_x=lambda r: r["file"], get_y=lambda r: r["label"], splitter=RandomSplitter(0.0, seed=0),
        batch_tfms=[*aug_transforms(), Normalize.from_stats(list(backbone.mean), list(backbone.std))],
    )
    dls = block.dataloaders(frame, bs=32, num_workers=0)
    net = create_network(ws, backbone.name, len(classes))
    head = {id(p) for p in net.get_classifier().parameters()}
    learn = Learner(dls, net, splitter=lambda m: [[p for p in m.parameters() if id(p) not in head],
                                                   [p for p in m.parameters() if id(p) in head]], train_bn=False)
    learn.remove_cb(FastaiProgress)
    learn.freeze()
    started = time.perf_counter()
    with learn.no_logging():
        learn.fit_one_cycle(1, 2e-3)
    return time.perf_counter() - started


def compare(ws, files: list[Path], labels: list[str], title: str) -> None:
    ids = [f"{i:064x}" for i in range(len(files))]  # cache keys; content hashes are not needed here
    started = time.perf_counter()
    ensure_resized(ws, ids, [str(f) for f in files], SIZE)
    build = time.perf_counter() - started
    cached = {str(f): resized_path(ws, i, SIZE) for f, i in zip(files, ids, strict=True)}

    def from_cache(path: Path) -> np.ndarray:
        with Image.open(cached[str(path)]) as img:
            return np.asarray(img.convert("RGB"))

    def full_decode(path: Path) -> np.ndarray:
        with Image.open(path) as img:
            return np.asarray(resize_and_crop(to_rgb(img), SIZE))

    fast = one_epoch(ws, files, labels, from_cache)  # first, so any warm-up cost falls on the project
    draft = one_epoch(ws, files, labels, lambda p: load_model_input(p, SIZE))
    full = one_epoch(ws, files, labels, full_decode)
    # The same three sources feeding a forward-only pass (feature extraction / the gate's re-evaluation),
    # where decoding is a larger share of the time: ONNX Runtime over an exported network.
    predictor = _predictor(ws, Path(ws.root) / "artifact")
    predictor.predict(np.stack([from_cache(f) for f in files[:32]]))  # warm-up, untimed
    timings = {}
    for name, load in (("cache", from_cache), ("draft", lambda p: load_model_input(p, SIZE)),
                       ("full", full_decode)):
        started = time.perf_counter()
        for i in range(0, len(files), 32):
            predictor.predict(np.stack([load(f) for f in files[i : i + 32]]))
        timings[name] = time.perf_counter() - started
    print(f"{title}: forward-only pass (ONNX) from cache {timings['cache']:.1f} s, full decode "
          f"{timings['full']:.1f} s ({timings['full'] / timings['cache']:.2f}x), draft decode {timings['draft']:.1f} s "
          f"({timings['draft'] / timings['cache']:.2f}x)")
    print(f"{title}: {len(files)} photos; one epoch from the resized cache {fast:.1f} s (built once in "
          f"{build:.1f} s); from originals with full decode {full:.1f} s -> cache {full / fast:.2f}x faster; "
          f"from originals with draft decode {draft:.1f} s -> cache {draft / fast:.2f}x faster")


def _predictor(ws, out: Path):
    from loop.model.artifact import load_predictor, save_artifact

    if not (out / "model.json").exists():
        backbone = get_backbone("tf_efficientnet_lite0")
        net = create_network(ws, backbone.name, 11)
        save_artifact(net, {"architecture": backbone.name, "classes": [f"c{i:02d}" for i in range(11)],
                            "image_size": SIZE, "mean": list(backbone.mean), "std": list(backbone.std)}, out)
    return load_predictor(out, "onnx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=Path("../shared/data/ikea_products"))
    parser.add_argument("--limit", type=int, default=128)
    parser.add_argument("--big", default="4000x3000", help="size of the upscaled copies; 'none' to skip")
    args = parser.parse_args()
    torch.set_num_threads(2)
    meta = pd.read_csv(args.dataset / "manifest.csv").sample(frac=1.0, random_state=0).head(args.limit)
    files = [args.dataset / p for p in meta["path"]]
    labels = meta["cls"].astype(str).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        ws = init_workspace(Path(tmp) / "ws")
        compare(ws, files, labels, f"photos as they are ({Image.open(files[0]).size[0]} px)")
        if args.big != "none":
            width, height = (int(v) for v in args.big.split("x"))
            big_dir = Path(tmp) / "big"
            big_dir.mkdir()
            big_files = []
            # sensor-like grain, so the JPEGs are as dense as a phone's (~2-3 MB), not smooth upscales
            grain = np.random.default_rng(0).normal(0, 6, (height, width, 3)).astype(np.int16)
            for i, f in enumerate(files):
                target = big_dir / f"{i}.jpg"
                up = np.asarray(Image.open(f).convert("RGB").resize((width, height), Image.Resampling.BILINEAR))
                Image.fromarray(np.clip(up + grain, 0, 255).astype(np.uint8)).save(target, quality=90)
                big_files.append(target)
            mb = sum(f.stat().st_size for f in big_files) / len(big_files) / 1e6
            print(f"made {len(big_files)} upscaled copies, {mb:.1f} MB each on average")
            bigger = init_workspace(Path(tmp) / "ws_big")
            (bigger.cache_dir / "weights").mkdir(parents=True, exist_ok=True)
            for w in (ws.cache_dir / "weights").iterdir():
                (bigger.cache_dir / "weights" / w.name).write_bytes(w.read_bytes())
            compare(bigger, big_files, labels, f"upscaled copies ({width}x{height} JPEG)")


if __name__ == "__main__":
    main()
