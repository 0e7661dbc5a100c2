"""What bench.py measures on: real class names (bench_classnames.json), synthetic images, JPEG files
of ImageNet-like size and a split data set of them. Run alone, it times test_loader's decode + CLIP
preprocess of such JPEGs for several worker counts:

    python bench_data.py --n 5000 --workers 0 1 2 [--dir /tmp/bench_jpegs] [--n-px 224]

It writes N random-texture 500x375 JPEGs (about ImageNet's typical size) once, then times one pass
of test_loader for each worker count. Not a test: the numbers depend on the machine's cores and
disk.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import Datum, test_loader

# the class names of the ten non-ImageNet benchmarks (OpenAI's CLIP prompt lists); the tokenizer
# tests read them too
CLASSNAMES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_classnames.json")


def make_jpegs(folder, n, size=(500, 375)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i:05d}.jpg")
        if not os.path.exists(path):
            # smooth colour blobs + noise: compresses like a photo (~50-100 kB), not like
            # flat colour or pure noise
            blobs = Image.fromarray(rng.randint(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
                size, Image.BICUBIC
            )
            noise = rng.randint(-20, 21, (size[1], size[0], 3))
            pixels = np.clip(np.asarray(blobs, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def bench_classnames(n):
    """n real class names of the benchmark: Caltech101's for 50 (its base classes), SUN397's then
    Food101's and StanfordCars' beyond (ImageNet's are not in the repo; these are as long). The text
    cut and the length buckets make prompt length matter."""
    with open(CLASSNAMES) as f:
        names = json.load(f)
    pool = (
        names["Caltech101"][:50]
        if n <= 50
        else names["SUN397"] + names["Food101"] + names["StanfordCars"]
    )
    return (pool * (n // len(pool) + 1))[:n]


def smooth_images(n, n_px, generator):
    """n synthetic images [n, 3, n_px, n_px]: random 7x7 colour fields
    upsampled, plus a little noise."""
    fields = torch.randn(n, 3, 7, 7, generator=generator)
    images = F.interpolate(fields, size=(n_px, n_px), mode="bicubic", align_corners=False)
    return images + 0.1 * torch.randn(images.shape, generator=generator)


def write_split_dataset(folder, n_classes, per_class, size=(500, 375)):
    """A folder data set with split.json: per_class = (train, val, test) JPEGs of each class."""
    rows = {"train": [], "val": [], "test": []}
    for c in range(n_classes):
        paths = make_jpegs(os.path.join(folder, f"class_{c}"), sum(per_class), size)
        start = 0
        for split, n in zip(rows, per_class):
            rows[split] += [[os.path.relpath(p, folder), c,
                             f"class {c}"] for p in paths[start:start + n]]
            start += n
    with open(os.path.join(folder, "split.json"), "w") as f:
        json.dump(rows, f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="JPEGs to read (default 5000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="worker counts to time (default 0 1 2)")
    parser.add_argument("--n-px", type=int, default=224, help="model resolution (default 224)")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="test_loader's batch (default 100)")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "bench_jpegs"),
                        help="where the JPEGs are written once (default %(default)s)")
    args = parser.parse_args(argv)

    t0 = time.time()
    paths = make_jpegs(args.dir, args.n)
    mb = sum(os.path.getsize(p) for p in paths) / 2**20
    print(f"{len(paths)} JPEGs 500x375 in {args.dir} ({mb:.0f} MiB, ready in "
          f"{time.time() - t0:.1f} s), {os.cpu_count()} cores")
    items = [Datum(p, 0, "x") for p in paths]
    for workers in args.workers:
        t0 = time.time()
        n = sum(len(labels) for _, labels in test_loader(items, args.n_px, args.batch_size,
                                                         workers))
        dt = time.time() - t0
        print(f"workers={workers}: {n} images in {dt:.1f} s = {n / dt:.0f} images/s")


if __name__ == "__main__":
    main()
