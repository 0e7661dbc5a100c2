"""How fast does test_loader feed a model? Decode + CLIP preprocess of N
JPEGs of ImageNet-like size.

    python -m data.bench_loader --n 5000 --workers 0 1 2 [--dir /tmp/bench_jpegs] [--n-px 224]

Writes N random-texture 500x375 JPEGs (about ImageNet's typical size) once, then times one pass of
test_loader for each worker count. Not a test: the numbers depend on the machine's cores and disk.
"""
import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from data import Datum, test_loader


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-px", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "bench_jpegs"))
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
