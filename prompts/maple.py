"""MaPLe: Multi-modal Prompt Learning (Khattak, Rasheed, Maaz, Khan, Khan. CVPR 2023).

Deep language prompts P_0 .. P_{J-1} in the first J layers of the text encoder, and vision prompts
that are not learned on their own but coupled to them: layer i of the image encoder gets
F_i(P_i), with F_i a linear map 512 -> 768 (Sec. 3.2, Eq. 4-6, "vision-language coupling").
  text   P_0 = ctx: "[SOS] v_1 v_2 of a {class}. [EOS]", v_1 v_2 from "a photo", "of a" kept fixed
         [code: MPL trainers/maple.py; confirmed in MPL issue #32]; P_i (i >= 1) ~ N(0, 0.02)
         replaces the 2 tokens after SOS before layer i.
  vision F_0(P_0) appended after the patch tokens, F_i(P_i) replacing them before layer i; the
         layers past J carry them forward. The coupling runs text -> vision only [paper].
F_0 is its own Linear (PyTorch's init); F_1 .. F_{J-1} start as copies of one Linear, all equal
[code: MPL trainers/maple.py, _get_clones]. Cross-entropy only.

Trainable for ViT-B/16, J = 9: P 9 x 2 x 512 = 9,216, F 9 x (512 x 768 +
768) = 3,545,856: 3,555,072.

Defaults: MPL (muzairkhattak/multimodal-prompt-learning)
configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml [paper]: 2 tokens, depth 9, SGD lr 0.0035,
batch 4, 5 epochs. Where each setting comes from, with the source files: docs/methods/maple.md.
"""
import copy

import torch.nn.functional as F
from torch import nn

from prompts.common import (
    PromptedCLIP,
    PromptLearner,
    check_depth,
    cosine_logits,
    layer_dict,
    prompt_tokens,
)

DEFAULTS = dict(
    # learn the first 2 tokens of ctx_init; "of a" stays ('' for random)
    n_ctx=2, ctx_init="a photo of a",
    depth=9,                           # J: layers 0..J-1 of each encoder carry prompts
    lr=0.0035, batch_size=4, epochs=5,
)
HELP = dict(  # and prompts.common.OPTION_HELP's
    depth="layers 0..depth-1 carry text prompts and their coupled vision tokens",
)
CHOICES = {}  # prompts.common.OPTION_CHOICES has this method's options
# On the toy world (--dataset toy, 4 + 4 layers, 12 classes x 16 shots):
# [ours], see prompts/__init__.py.
TOY = dict(epochs=20, batch_size=8, lr=DEFAULTS["lr"] / 2, depth=3)  # batch 16: seed spread 4.2


def protocol_defaults(protocol, dataset, shots):
    """[code] MaPLe's vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml (and domain generalisation)."""
    return dict(depth=3, lr=0.0026, epochs=2) if protocol == "crossdataset" else {}


class CustomCLIP(PromptedCLIP):
    def __init__(self, clip_model, classnames, template, cfg):
        super().__init__()
        self.clip, self.cfg = clip_model, cfg
        # P_0
        self.prompt_learner = PromptLearner(clip_model, classnames, cfg["n_ctx"], cfg["ctx_init"])
        depth = cfg["depth"]
        check_depth(clip_model, depth)
        text_width, vision_width = (
            clip_model.ln_final.weight.shape[0],
            clip_model.visual.conv1.out_channels,
        )
        # P_1 .. P_{J-1}
        self.text_prompts = prompt_tokens(depth - 1, self.prompt_learner.n_ctx, text_width)
        deeper = nn.Linear(text_width, vision_width)
        self.proj = nn.ModuleList([nn.Linear(text_width, vision_width)]  # F_0
                                  # F_1 .. F_{J-1}
                                  + [copy.deepcopy(deeper) for _ in range(depth - 1)])

    def vision_deep_prompts(self):
        """{layer i: F_i(P_i)} for i = 0 .. J-1, each [n_ctx, 768]."""
        text = [self.prompt_learner.ctx[0], *self.text_prompts]  # P_0 .. P_{J-1}, each [n_ctx, 512]
        return {i: f(p) for i, (f, p) in enumerate(zip(self.proj, text))}

    def text_features(self):
        # [n_cls, D]
        return self.prompt_learner.encode(self.clip, layer_dict(self.text_prompts, 1))[0]

    def logits(self, images, text_features):
        image_features = F.normalize(
            self.clip.encode_image(images, deep_prompts=self.vision_deep_prompts()), dim=-1
        )
        return cosine_logits(self.clip, image_features, text_features)
