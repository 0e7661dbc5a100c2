"""A tiny random CLIP for fast CPU tests: same layout and names as OpenAI's, a
few MB instead of 350; the methods built on it; and, for counts that depend only on shapes, a
random CLIP of ViT-B/16's sizes."""
import functools
import math

import pytest
import torch

import options
import prompts
import train
from clip.model import CLIP

TINY_CONFIG = dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64,
                   vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=64,
                   transformer_layers=2)

CLASSNAMES = ["cat", "sea lion", "golden retriever"]  # 1, 2 and 2 BPE tokens
TEMPLATE = "a photo of a {}."


@torch.no_grad()
def tiny_clip(seed=0, **overrides):
    """A float32 CLIP in eval mode with every tensor drawn from `seed` (so LayerNorms and biases are
    not the trivial 1/0 either, and a bug that ignores one of them shows up in the features).

    overrides: any CLIP argument, e.g. vocab_size=512 for a smaller file. transformer_heads defaults
    to transformer_width // 64, like the vision side. The caller's global RNG is left untouched.
    """
    config = {**TINY_CONFIG, **overrides}
    config.setdefault("transformer_heads", config["transformer_width"] // 64)
    with torch.random.fork_rng(devices=[]):  # CLIP.__init__ draws from the global RNG
        model = CLIP(**config)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name == "logit_scale":
            p.copy_(math.log(1 / 0.07) + 0.1 * noise)
        elif ".ln_" in name or name.startswith("ln_"):  # LayerNorm: weight near 1, bias near 0
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
        # matrices: ~unit-variance outputs, so 2 layers stay well away from 0 or inf
        elif p.dim() >= 2:
            p.copy_(noise * p[0].numel() ** -0.5)
        else:  # biases, class embedding
            p.copy_(0.02 * noise)
    return model.eval()


def tiny_settings(method):
    """What `method` needs to fit the tiny CLIP (2 + 2 layers), read from its DEFAULTS: each
    option counted in layers (depth; n_prompts, PMPO's one partition of the prompted layers per
    prompt) at most 2. Every test that builds or trains a method reads it from here, so a new
    method needs no test edit."""
    defaults = prompts.METHODS[method].DEFAULTS
    layers = TINY_CONFIG["vision_layers"]
    return {k: min(defaults[k], layers) for k in ("depth", "n_prompts") if k in defaults}


def tiny_config(method, **flags):
    """train.py's settings for `method` fitted to the tiny CLIP, from the resolver train.py uses
    (options.config): on the CPU unless flags say otherwise."""
    return options.config(method, "caltech101", **{"device": "cpu", **tiny_settings(method),
                                                   **flags})


@functools.lru_cache(maxsize=None)
def stage_count(method):
    """How many stages `method` trains in (APLe: 3), from the model itself."""
    cfg = tiny_config(method)
    return len(prompts.build(method, tiny_clip(), ["cat", "dog"], "a photo of a {}.",
                             cfg).stages(cfg))


def tiny_train_step(method, classnames, lr, **flags):
    """(model, optimizer, step): `method` on the tiny CLIP in its last stage (everything it defines
    learns) and train.py's step for it, SGD as train.py's; flags: train.py's (device, precision,
    cuda_graphs; default the CPU's)."""
    cfg = tiny_config(method, **flags)
    model = prompts.build(method, tiny_clip().requires_grad_(False), classnames, "a photo of a {}.",
                          cfg)
    model.set_stage(model.stages(cfg)[-1][0])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    return model, optimizer, train.train_step(model, optimizer, cfg)


def tiny_flags(method, epochs):
    """train.py flags for `method` on the tiny CLIP, trained `epochs` epochs in all (at least one
    per stage: see stage_count). A method with stage_epochs (APLe) gets them split over its
    stages, the last taking the remainder; one with a GPA Gaussian (PromptSRC) gets its mean at
    the paper's 15/20 of the run."""
    defaults = prompts.METHODS[method].DEFAULTS
    flags = [f for key, value in tiny_settings(method).items() for f in (f"--{key}", str(value))]
    if "gpa_mean" in defaults:
        flags += ["--gpa_mean", str(0.75 * epochs)]
    if "stage_epochs" in defaults:
        n = len(defaults["stage_epochs"])
        split = [epochs // n] * (n - 1) + [epochs - (n - 1) * (epochs // n)]
        return flags + ["--stage_epochs", *map(str, split)]
    return flags + ["--epochs", str(epochs)]


def tiny_method(method, clip_model, **overrides):
    """`method` on the tiny CLIP; its settings are kept as model.cfg."""
    cfg = {**tiny_config(method), **overrides}  # as given: a test may pass what train.py refuses
    model = train.build_method(method, clip_model, CLASSNAMES, TEMPLATE, cfg)
    model.cfg = cfg
    return model


@pytest.fixture(scope="module")
def vit_b16():
    """A randomly initialised, frozen CLIP with ViT-B/16's sizes (the counts
    depend only on shapes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)
    return model.requires_grad_(False).eval()
