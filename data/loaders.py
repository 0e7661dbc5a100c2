"""Image decoding, the in-memory few-shot train set, and the parallel test loader.

A few-shot train set is small (16 shots x 100 classes = 1,600 images) and is read for many
epochs, so TrainSet decodes each file once and keeps the RGB image in memory; only the random
crop runs per step. On a GPU the crops are resized there (device=...), so the CPU only cuts them
out of the decoded pixels. A test set is large and read once, so test_loader decodes in
DataLoader worker processes.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from clip.transform import to_uint8
from data.transforms import test_transform, train_transform, train_transform_on_device


def load_image(path):
    """Decode an image to RGB (Dassl's read_image converts first, so
    resizing sees RGB pixels too)."""
    try:
        with Image.open(path) as img:
            # 16-bit grey (PIL opens a 16-bit PNG as mode I): PIL's convert clips at 255
            if img.mode in ("I", "F") or img.mode.startswith("I;16"):
                img = grey_to_8bit(np.asarray(img, dtype=np.float64), img.mode)
            return img.convert("RGB")
    # e.g. truncated
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def grey_to_8bit(grey, mode):
    """0..65535 -> 0..255. Float pixels, or 32-bit integers outside that range, have no agreed
    scale (clipping would read them all white or black): refused."""
    low, high = (float(grey.min()), float(grey.max())) if grey.size else (0.0, 0.0)
    if mode == "F" or not (0 <= low and high <= 65535):
        raise ValueError(f"{mode!r} pixels span {low:g}..{high:g}, which have no 8-bit scale; "
                         f"convert the image to 8 or 16 bits per channel")
    return Image.fromarray((grey / 257).round().clip(0, 255).astype(np.uint8))


def default_workers():
    return min(8, os.cpu_count() or 1)  # Dassl's test loader uses 8 workers


class TrainSet(torch.utils.data.Dataset):
    """items -> (train_transform(image) [3, n_px, n_px], label), every file
    decoded once in __init__.

    Randomness: in the main process the crops come from torch.Generator().manual_seed(seed) (or
    torch's global RNG when seed is None), so a seeded run is reproducible. Inside DataLoader
    workers the global RNG is used, which the DataLoader seeds per worker from its own generator;
    seed that one for reproducibility. Memory: decoded images stay in RAM (16-shot ImageNet is about
    16k images, roughly 7 GB). device: None resizes each crop with PIL (the reference); a device
    (e.g. "cuda") keeps the pixels as uint8 tensors and resizes there (train_transform_on_device).
    Then use it with num_workers=0.
    """

    def __init__(self, items, n_px, seed=None, threads=None, device=None):
        self.items, self.n_px, self.device = list(items), n_px, device
        paths = sorted({item.impath for item in self.items})  # a repeated path is decoded once too
        decode = load_image if device is None else (lambda path: to_uint8(load_image(path)))
        # PIL decodes without the GIL
        with ThreadPoolExecutor(threads or default_workers()) as pool:
            self.images = dict(zip(paths, pool.map(decode, paths)))
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        generator = self.generator if torch.utils.data.get_worker_info() is None else None
        if self.device is None:
            return train_transform(self.images[item.impath], self.n_px, generator), item.label
        return train_transform_on_device(self.images[item.impath], self.n_px, self.device,
                                         generator), item.label


class TestSet(torch.utils.data.Dataset):
    def __init__(self, items, n_px):
        self.items, self.preprocess = list(items), test_transform(n_px)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        return self.preprocess(load_image(item.impath)), item.label


def test_loader(items, n_px, batch_size=100, workers=None):
    """Batches (images [B, 3, n_px, n_px], labels [B]) in the order of items; decoding runs
    in `workers` processes."""
    workers = default_workers() if workers is None else workers
    testset = TestSet(items, n_px)
    # a batch larger than the test set is the test set: the same batches, and DataLoader's sampler
    # (itertools.islice) refuses a batch size above sys.maxsize
    return torch.utils.data.DataLoader(
        testset, batch_size=max(1, min(batch_size, len(testset))), shuffle=False,
        num_workers=workers, pin_memory=torch.cuda.is_available()
    )
