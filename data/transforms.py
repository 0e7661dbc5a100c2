"""Train and test transforms of CoOp/Dassl, in PIL + torch (no torchvision).

test:  CLIP's own preprocess, clip.transform.Preprocess(n_px): resize shorter side (bicubic),
       center crop.
train: RandomResizedCrop(n_px, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic) -> RandomHorizontalFlip
       -> ToTensor -> Normalize(CLIP mean/std): Dassl's INPUT.TRANSFORMS of every CoOp/MaPLe config.

The crop follows torchvision's RandomResizedCrop.get_params draw for draw (same torch RNG calls,
same float32 log-ratio), so with the same torch seed it picks the same boxes torchvision would.
train_transform_on_device is the GPU path of the same transform (train.py's --augment_on_device):
same boxes, torch's resize.
"""

import math

import torch
import torch.nn.functional as F
from PIL import Image

from clip.transform import Preprocess, normalize, to_tensor

# test_transform(n_px)(img): one implementation of the test transform in the repo
test_transform = Preprocess


def random_resized_crop_box(width, height, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """(left, top, w, h) of a random crop covering `scale` of the area with
    aspect ratio in `ratio`."""
    area = width * height
    # float32, as torchvision: the draws below depend on it
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                   generator=generator)).item()
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


def random_crop_and_flip(width, height, generator=None):
    """The random part of the train transform: a crop box (left, top, w, h) and whether to flip."""
    box = random_resized_crop_box(width, height, generator=generator)
    return box, torch.rand(1, generator=generator).item() < 0.5  # RandomHorizontalFlip(p=0.5)


def train_transform(img, n_px, generator=None):
    """PIL RGB image -> augmented, normalised tensor [3, n_px, n_px]. generator=None
    uses torch's global RNG."""
    (left, top, w, h), flip = random_crop_and_flip(*img.size, generator)
    img = img.crop((left, top, left + w, top + h)).resize((n_px, n_px), Image.BICUBIC)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return normalize(to_tensor(img))


def train_transform_on_device(img, n_px, device, generator=None):
    """The same transform for a uint8 tensor [3, H, W]: the crop is cut on the
    CPU, resized on `device`.

    Same random draws, so the same boxes and flips as train_transform with the same generator. The
    resize is torch's antialiased bicubic, PIL's kernel (a = -0.5, widened when shrinking) in float
    instead of PIL's fixed-point passes: on a noisy 500x375 image, 20 crops, the pixels differ by
    0.2/255 on average and by more than 1/255 at 0.03% of them (up to 13/255 where PIL clips between
    its two passes); tests/test_data.py checks this.
    """
    (left, top, w, h), flip = random_crop_and_flip(img.shape[2], img.shape[1], generator)
    # [3, h, w], 0..255
    crop = img[:, top:top + h, left:left + w].to(device, non_blocking=True).float()
    x = F.interpolate(crop[None], size=(n_px, n_px), mode="bicubic", antialias=True,
                      align_corners=False)[0]
    x = x.round().clamp(0, 255).div(255)  # [3, n_px, n_px]; PIL stores uint8, so round as it does
    if flip:
        x = x.flip(-1)
    return normalize(x)
