"""clip/transform.py against torchvision's rules for Resize(224) +
CenterCrop(224), worked out by hand.

torchvision cannot be imported beside the CPU torch here, so the expected sizes and offsets are
computed from its documented formulas: long side int(224 * long / short), crop offset
int(round((size - 224) / 2)) with Python's round-half-to-even.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from clip.transform import MEAN, STD, Preprocess, center_crop, resize_shorter


@pytest.mark.parametrize("size, resized", [
    ((500, 375), (298, 224)),   # 224 * 500 / 375 = 298.67 -> 298 (truncated, not rounded)
    ((375, 500), (224, 298)),
    ((640, 480), (298, 224)),   # 298.67 again
    ((333, 500), (224, 336)),   # 336.33 -> 336
    ((224, 300), (224, 300)),   # shorter side already 224: untouched
    ((100, 100), (224, 224)),   # upsampling
])
def test_resize_shorter_side(size, resized):
    assert resize_shorter(Image.new("RGB", size), 224).size == resized


@pytest.mark.parametrize("width, left", [(226, 1), (225, 0), (227, 2), (298, 37), (229, 2)])
def test_center_crop_offsets_round_half_to_even(width, left):
    """(225-224)/2 = 0.5 -> 0 and (227-224)/2 = 1.5 -> 2: banker's rounding, as
    torchvision's int(round(.))."""
    columns = np.tile(np.arange(width, dtype=np.uint8), (224, 1))  # pixel value = its column
    crop = center_crop(Image.fromarray(columns), 224)
    assert crop.size == (224, 224)
    assert np.asarray(crop)[0, 0] == left


def test_preprocess_pixels():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    x = Preprocess(224)(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # the same pipeline spelled out: PIL bicubic resize to 298x224, crop at
    # left 37, /255, CLIP mean/std
    ref = np.asarray(img.resize((298, 224), Image.BICUBIC).crop((37, 0, 261, 224)),
                     dtype=np.float32) / 255
    ref = (
        torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(MEAN).view(3, 1, 1)
    ) / torch.tensor(STD).view(3, 1, 1)
    assert torch.equal(x, ref)


def test_preprocess_converts_to_rgb_after_cropping():
    """Grey and palette images come out as 3 channels, like OpenAI's _convert_image_to_rgb step."""
    for mode in ("L", "P", "RGBA"):
        assert Preprocess(32)(Image.new(mode, (50, 40))).shape == (3, 32, 32)
