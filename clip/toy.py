"""The toy world: a tiny CLIP pre-trained in seconds on drawn images, so
every method runs on a laptop.

nanoGPT has its character-level Shakespeare; this is the same idea for prompt learning. The world
has 24 classes with made-up looks: each class name ("cat", "owl", ...) is a colour, one of 24 hues
evenly spaced on the colour circle, drawn as 32-pixel images with noise. There are two renderings:

    bright: the class hue, bright;                           captioned "a photo of a {name}."
    dark:   the hue moved DARK_HUE_SHIFT of a step, darker;  captioned "a photo of a dark {name}."

`clip.load("toy")` reads a tiny CLIP (TOY_CLIP) pre-trained contrastively on both renderings of all
24 classes, as real CLIP saw every class of the benchmarks in its captions. It ships with the
repository (toy_clip.npz, sha256-pinned below), so every machine gets the same world:
`python -m clip.toy --build` runs the pre-training again (pretrain(), the tutorial) and says whether
it gave the shipped weights.
`--dataset toy` (data/toy.py) is dark images only, classified with the template "a photo of a {}.":
the template does not say "dark", so zero-shot CLIP reads a dark image as a bright one of the
neighbouring hue, and is right only part of the time. That gap is what prompt learning has to close
from 16 shots of the base classes, and then carry over to the novel ones it never saw.
"""

import hashlib
import json
import os
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

from .files import atomic_write, file_digest
from .model import CLIP
from .tokenizer import tokenize
from .transform import MEAN, STD

# -- the world's knobs -----------------------------------------------------------------------------
# Class names are one BPE token each; the i-th name here has hue i / len(CLASSNAMES) of the circle.
# Labels follow the sorted names (data/toy.py writes one folder per class), so the base half is the
# first 12 in alphabetical order ("ant" to "fish"). [ours] The order below alternates base and novel
# around the circle, so each half's hues are two steps apart and the dark shift (half a step) never
# lands on a neighbour of the same half: with the base and novel hues in clumps (the alphabet's
# order), a novel class sat on a knife edge between two novel neighbours, and which side it fell on
# moved from seed to seed (seed spreads of 4 to 9 points on novel, measured).
CLASSNAMES = ["ant", "fox", "bat", "frog", "bear", "goat", "bee", "horse",
              "bird", "lion", "cat", "owl", "cow", "pig", "crab", "rat",
              "deer", "seal", "dog", "sheep", "duck", "snake", "fish", "wolf"]
SATURATION = (0.6, 1.0)       # drawn per image
BRIGHT_VALUE = (0.7, 1.0)     # brightness of the bright rendering, drawn per image
DARK_VALUE = (0.35, 0.55)     # ... and of the dark rendering (the downstream data set)
# in hue steps: a dark image sits halfway between its class hue and the next one
DARK_HUE_SHIFT = 0.5
# std of the per-image hue jitter, in turns of the circle (a step is 1/24)
HUE_NOISE = 0.01
PIXEL_NOISE = 0.08            # std of per-pixel RGB noise
IMAGE_SIZE = 32               # pixels; the tiny CLIP's input resolution
# pre-training captions of rendering 0 and 1
CAPTIONS = ("a photo of a {}.", "a photo of a dark {}.")
BRIGHT, DARK = 0, 1

# -- the tiny CLIP and its pre-training ------------------------------------------------------------
TOY_CLIP = dict(embed_dim=64, image_resolution=IMAGE_SIZE, vision_layers=4, vision_width=64,
                vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=64,
                transformer_heads=1, transformer_layers=4)
# AdamW, one-cycle schedule. [ours] seed 1 and 300 steps: of seeds 0-7 at 150 and 300 steps tried on
# one machine, the world with the highest zero-shot base and novel that still leaves methods room
# (chosen before the class order above; 600 steps gave a CLIP that deep vision prompts wrecked).
PRETRAIN = dict(seed=1, steps=300, batch=128, lr=4e-3, weight_decay=0.1, warmup=0.1)


def fingerprint():
    """A short hash of the drawing knobs above: data/toy.py redraws its data set if one changed."""
    knobs = dict(CLASSNAMES=CLASSNAMES, SATURATION=SATURATION, BRIGHT_VALUE=BRIGHT_VALUE,
                 DARK_VALUE=DARK_VALUE, DARK_HUE_SHIFT=DARK_HUE_SHIFT, HUE_NOISE=HUE_NOISE,
                 PIXEL_NOISE=PIXEL_NOISE, IMAGE_SIZE=IMAGE_SIZE)
    return hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:12]


# -- drawing ---------------------------------------------------------------------------------------

def hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB; arrays of the same shape in [0, 1] -> [..., 3]."""
    i = (np.floor(h * 6) % 6).astype(int)
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.stack([np.choose(i, [v, q, p, p, t, v]), np.choose(i, [t, v, v, q, p, p]),
                     np.choose(i, [p, p, t, v, v, q])], axis=-1)


def draw(label, rendering, rng, size=IMAGE_SIZE):
    """One image of class `label` (an index into CLASSNAMES) as uint8 [size, size, 3]."""
    hue = ((label + DARK_HUE_SHIFT * rendering) / len(CLASSNAMES) + rng.normal(0, HUE_NOISE)) % 1.0
    value = rng.uniform(*(DARK_VALUE if rendering == DARK else BRIGHT_VALUE))
    colour = hsv_to_rgb(np.array(hue), np.array(rng.uniform(*SATURATION)), np.array(value))  # [3]
    pixels = colour + rng.normal(0, PIXEL_NOISE, (size, size, 3))  # [size, size, 3]
    return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)


def to_model_input(images):
    """uint8 [B, H, W, 3] -> CLIP-normalised float [B, 3, H, W] (what
    clip.transform's preprocess gives)."""
    x = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2)  # [B, 3, H, W]
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# -- pre-training ----------------------------------------------------------------------------------

def pretrain(log=None):
    """CLIP's contrastive loss on (image, caption) pairs of both renderings of
    all classes. Returns a CLIP.

    A batch's text side is all 48 captions (24 classes x 2 renderings): an image's target is its
    caption, a caption's target is spread evenly over the images it describes. Only the rows of the
    token embedding the captions use are learned (a small table written back at the end), which
    spares AdamW 3M untouched values a step. One thread, fixed seeds: the same weights on every run.
    """
    cfg, n = PRETRAIN, len(CLASSNAMES)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            model = CLIP(**TOY_CLIP)  # OpenAI's initialisation, but for the token embedding:
            with torch.no_grad():
                model.token_embedding.weight.copy_(filler_rows())  # regenerable rows [ours]
            rng = np.random.default_rng(cfg["seed"])
            # [48, 77]
            text = tokenize([caption.format(name) for caption in CAPTIONS for name in CLASSNAMES])
            used = torch.unique(text)
            row = torch.zeros(model.token_embedding.num_embeddings, dtype=torch.long)
            row[used] = torch.arange(len(used))
            # [n_used, width]
            words = torch.nn.Parameter(model.token_embedding.weight.detach()[used].clone())
            model.token_embedding.requires_grad_(False)
            params = [p for p in model.parameters() if p.requires_grad] + [words]
            optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"],
                                                           total_steps=cfg["steps"],
                                                           pct_start=cfg["warmup"])
            model.train()
            start = time.time()
            for step in range(cfg["steps"]):
                labels, rendering = rng.integers(0, n, cfg["batch"]), rng.integers(0, 2,
                                                                                   cfg["batch"])
                images = to_model_input(np.stack([draw(c, r, rng) for c, r in zip(labels,
                                                                                  rendering)]))
                # the caption of each image, in [0, 48)
                target = torch.from_numpy(rendering * n + labels)
                loss = contrastive_loss(model, images, text, words[row[text]], target, 2 * n)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                if log and (step + 1) % 100 == 0:
                    log(f"  step {step + 1}/{cfg['steps']}  loss {loss.item():.3f} "
                        f" {time.time() - start:.0f}s")
            with torch.no_grad():
                model.token_embedding.weight[used] = words
            return model.requires_grad_(True).eval()
    finally:
        torch.set_num_threads(threads)


def contrastive_loss(model, images, text, embeddings, target, n_captions):
    """(image -> caption cross-entropy + caption -> images cross-entropy) / 2, CLIP's
    symmetric loss (Sec. 2.3)."""
    image_features = F.normalize(model.encode_image(images), dim=-1)  # [B, D]
    text_features = F.normalize(model.encode_text(text, embeddings=embeddings), dim=-1)  # [48, D]
    logits = model.logit_scale.exp() * image_features @ text_features.t()  # [B, 48]
    per_caption = F.one_hot(target, n_captions).float().t()  # [48, B]
    present = per_caption.sum(1) > 0  # captions with at least one image in this batch
    per_caption = per_caption[present] / per_caption[present].sum(1, keepdim=True)
    loss_text = -(F.log_softmax(logits.t()[present], dim=1) * per_caption).sum(1).mean()
    return (F.cross_entropy(logits, target) + loss_text) / 2


# -- the shipped file ----------------------------------------------------------------------------
# The tiny CLIP is pre-trained once and shipped, so the world is the same on every machine: its
# pre-training is chaotic in the last bits, and CPUs add in other orders (AVX-512, AVX2 and scalar
# kernels; ARM), so each machine would build another CLIP, and print another table. Reading a file
# is exact everywhere.
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_clip.npz")
SHIPPED_SHA256 = "1a99235651e23cfbb5d1e6529bfddd930eb5a746b812e5a395c522b377d6fbd7"
FILLER_SEED = 0  # of the token-embedding rows no caption uses (filler_rows)
PACKED = ("token_embedding.ids", "token_embedding.rows")  # in the file, for token_embedding.weight


def filler_rows(seed=FILLER_SEED):
    """The token embedding before pre-training, [49408, width]: uniform, std 0.02 as CLIP's [ours].

    Pre-training moves only the rows its captions use; every other row (a word the world never
    says: most of PromptSRC's 60 templates) keeps this value, so the file stores the moved rows and
    the rest is regenerated on load: PCG64's 53-bit integers as doubles, one multiply, one cast, the
    same bits on every machine (a Gaussian's log and cos could differ in the last bit)."""
    half_width = 0.02 * 3 ** 0.5  # U(-a, a) has std a / sqrt(3)
    u = np.random.default_rng(seed).random((TOY_CLIP["vocab_size"], TOY_CLIP["transformer_width"]))
    return torch.from_numpy(((2 * u - 1) * half_width).astype(np.float32))


def pack(state_dict):
    """A toy CLIP's state_dict -> what the file holds: the token-embedding rows that differ from
    filler_rows() (ids and rows), every other tensor as it is."""
    packed = {k: v for k, v in state_dict.items() if k != "token_embedding.weight"}
    weight = state_dict["token_embedding.weight"]
    ids = torch.nonzero((weight != filler_rows()).any(1)).flatten()
    packed.update({PACKED[0]: ids, PACKED[1]: weight[ids].clone()})
    return packed


def unpack(packed):
    """The file's tensors -> a CLIP state_dict (clip.load reads any file holding PACKED so).
    ValueError unless the ids are rows of filler_rows() and the rows fit them."""
    state_dict = {k: v for k, v in packed.items() if k not in PACKED}
    weight = filler_rows()
    ids, rows = packed[PACKED[0]], packed.get(PACKED[1], torch.empty(0))
    # a negative id would index from the end, and a float or bool one is no row number
    if (ids.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
            or ids.dim() != 1 or not ((0 <= ids) & (ids < len(weight))).all()
            or rows.shape != (len(ids), weight.shape[1])):
        raise ValueError(f"{PACKED[0]} must hold integer ids 0..{len(weight) - 1} and {PACKED[1]} "
                         f"one row of {weight.shape[1]} numbers per id (clip/toy.py's save writes "
                         f"them)")
    weight[ids] = rows.float()  # a float16 file loads as the float32 CLIP it rounds
    state_dict["token_embedding.weight"] = weight
    return state_dict


def save(model, path):
    """Write a pre-trained toy CLIP as the repository ships it (atomically): numpy's .npz, plain
    arrays that load with no pickle, each member dated 1980 so the same weights give the same
    bytes."""
    with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w") as archive:
        for name, tensor in sorted(pack(model.state_dict()).items()):
            member = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(member, "w") as out:
                np.lib.format.write_array(out, tensor.numpy(), allow_pickle=False)


def read(path):
    """The tensors of a file save() wrote (pack's names), read without unpickling anything."""
    with np.load(path, allow_pickle=False) as arrays:
        return {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}


def file_sha256(path):
    return file_digest(path, "sha256")


def shipped():
    """Path of the shipped toy CLIP, refused with a clear message if it is not the pinned file."""
    if not os.path.isfile(SHIPPED):
        raise RuntimeError(f"{SHIPPED} is missing: the toy CLIP ships with the repository "
                           f"(git checkout clip/toy_clip.npz)")
    if (digest := file_sha256(SHIPPED)) != SHIPPED_SHA256:
        raise RuntimeError(f"{SHIPPED} has sha256 {digest}, not the pinned {SHIPPED_SHA256} "
                           f"(clip/toy.py): restore it with git checkout clip/toy_clip.npz")
    return SHIPPED


def build(out):
    """python -m clip.toy --build: pre-train the toy CLIP again into `out`; compare it."""
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"pre-training the toy CLIP: {PRETRAIN['steps']} steps on one thread (a minute or two)")
    start = time.time()
    model = pretrain(log)
    save(model, out)
    log(f"built in {time.time() - start:.0f}s -> {out} (sha256 {file_sha256(out)})")
    ours = read(SHIPPED)
    built = pack(model.state_dict())
    differ = [k for k in ours if k not in built or not torch.equal(ours[k], built[k])]
    if not differ and set(built) == set(ours):
        log(f"the same weights as the shipped {SHIPPED}, bit for bit")
        return True
    worst = max((float((ours[k] - built[k]).abs().max()) for k in differ
                 if k in built and ours[k].shape == built[k].shape), default=float("nan"))
    log(f"NOT the shipped {SHIPPED}: {len(differ)} of {len(ours)} tensors differ (largest "
        f"difference {worst:.2g}). Expected on another CPU: pre-training is chaotic in the last "
        f"bits, and the CPU's matrix kernels (AVX-512, AVX2, scalar: ATEN_CPU_CAPABILITY; ARM's) "
        f"add in other orders, so each builds its own tiny CLIP. That is why the repository "
        f"ships one: clip.load('toy') reads it and never builds.")
    return False


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="The toy world's tiny CLIP: clip.load('toy') reads the "
                                "shipped file; --build pre-trains it again and compares.")
    p.add_argument("--build", action="store_true", help="pre-train it, compare with the shipped")
    p.add_argument("--out", default="toy_clip_built.npz", help="where --build writes (%(default)s)")
    a = p.parse_args()
    if not a.build:
        p.error("nothing to do: pass --build (clip.load('toy') needs no building)")
    sys.exit(0 if build(a.out) else 1)
