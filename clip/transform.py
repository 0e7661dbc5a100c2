"""CLIP's test-time preprocessing in PIL + torch, equal to torchvision's to the last bit.

torchvision's pipeline is Resize(n_px, BICUBIC) -> CenterCrop(n_px) -> RGB -> ToTensor -> Normalize.
Two details decide the pixels, and both are copied here:
- Resize sets the shorter side to n_px and the longer to int(n_px * long / short), truncated;
- CenterCrop's offsets are int(round((size - n_px) / 2)), with Python's round-half-to-even.
"""
import numpy as np
import torch
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shorter(img, n_px):
    """Resize a PIL image so its shorter side is n_px, keeping the aspect ratio (bicubic)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == n_px:
        return img
    new_short, new_long = n_px, int(n_px * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize(size, Image.BICUBIC)


def center_crop(img, n_px):
    w, h = img.size
    top, left = int(round((h - n_px) / 2.0)), int(round((w - n_px) / 2.0))
    return img.crop((left, top, left + n_px, top + n_px))


def to_uint8(img):
    """PIL RGB image -> uint8 tensor [3, H, W]."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # [H, W, 3]
    return x.permute(2, 0, 1).contiguous()  # [3, H, W]


def to_tensor(img):
    """PIL RGB image -> float tensor [3, H, W] in [0, 1] (torchvision's ToTensor)."""
    return to_uint8(img).float().div(255)


# built once, not per image
_MEAN, _STD = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)


def normalize(x):
    """(x - mean) / std per channel, CLIP's statistics; x: [..., 3, H, W]
    in [0, 1] on any device."""
    return (x - _MEAN.to(x)) / _STD.to(x)


class Preprocess:
    """The `preprocess` that clip.load returns: PIL image -> normalised tensor [3, n_px, n_px]."""

    def __init__(self, n_px):
        self.n_px = n_px

    def __call__(self, img):
        img = center_crop(resize_shorter(img, self.n_px), self.n_px)
        return normalize(to_tensor(img.convert("RGB")))

    def __repr__(self):
        return (f"Preprocess(resize shorter side to {self.n_px} (bicubic), "
                f"center crop {self.n_px}, CLIP mean/std)")
