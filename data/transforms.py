"""Train and test transforms of CoOp/Dassl, in PIL + torch (no torchvision).

test: CLIP's own preprocess, clip.transform.Preprocess(n_px): resize shorter side (bicubic), center crop.
train: RandomResizedCrop(n_px, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic) -> RandomHorizontalFlip(0.5)
       -> ToTensor -> Normalize(CLIP mean/std), Dassl's INPUT.TRANSFORMS for every CoOp/MaPLe config.

The crop follows torchvision's RandomResizedCrop.get_params draw for draw (same torch RNG calls, same
float32 log-ratio), so with the same torch seed it picks the same boxes torchvision would.
"""
import math

import torch
from PIL import Image

from clip.transform import Preprocess, normalize, to_tensor

test_transform = Preprocess  # test_transform(n_px)(img): one implementation of the test transform in the repo


def random_resized_crop_box(width, height, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """(left, top, w, h) of a random crop covering `scale` of the area with aspect ratio in `ratio`."""
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision: the draws below depend on it
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return left, top, w, h
    # 10 misses (very elongated image): a center crop with the aspect ratio clamped into `ratio`
    aspect = width / height
    if aspect < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif aspect > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(img, n_px, generator=None):
    """PIL RGB image -> augmented, normalised tensor [3, n_px, n_px]. generator=None uses torch's global RNG."""
    left, top, w, h = random_resized_crop_box(*img.size, generator=generator)
    img = img.crop((left, top, left + w, top + h)).resize((n_px, n_px), Image.BICUBIC)
    if torch.rand(1, generator=generator).item() < 0.5:  # RandomHorizontalFlip(p=0.5)
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return normalize(to_tensor(img))
