"""CoCoOp: Conditional Context Optimization (Zhou, Yang, Loy, Liu. "Conditional Prompt Learning for
Vision-Language Models", CVPR 2022).

CoOp's context, shifted per image: a small meta-net h turns the image feature x into a token pi
= h(x) added to every context vector, v_m(x) = v_m + pi (Sec. 3.2, Eq. 3 and 4). The class
features are therefore per image: t_c(x) is the text encoder on "[SOS] v_1(x) ... v_M(x)
{class}. [EOS]", and the logit of class c is exp(logit_scale) * cos(x, t_c(x)) (Eq. 5). h is
Linear(512 -> 32), ReLU, Linear(32 -> 512) [paper], PyTorch's default init [paper]; it reads the
normalised image feature [paper].

Trainable: ctx, 4 x 512 = 2,048, and the meta-net, 16,416 + 16,896: 35,360 for ViT-B/16.

Cost: a step sends batch x classes prompts through the text encoder, in training and in evaluation.
They go `prompts_per_chunk` at a time (whole images' worth, at least one image) [ours]: that bounds
the memory of evaluating 100 images x 1,000 classes and changes numbers by float rounding only.

Defaults: the base-to-novel config, CoOp repo
configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml [paper]: 4 tokens from "a photo
of a", SGD lr 0.002, batch 1, 10 epochs. Where each setting comes from, with the source
files: docs/methods/cocoop.md.
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from prompts.common import PromptedCLIP, PromptLearner, Range, cosine_logits

DEFAULTS = dict(
    n_ctx=4, ctx_init="a photo of a",  # 4 tokens from ctx_init; '' for random N(0, 0.02)
    prompts_per_chunk=5000,            # text-encoder sequences sent at once (images x classes)
    lr=0.002, batch_size=1, epochs=10,
)
HELP = dict(  # and prompts.common.OPTION_HELP's
    prompts_per_chunk="text-encoder sequences sent at once (images x classes); memory only",
)
# + common.OPTION_CHOICES. A chunk of 10**6 77-token prompts is 158 GB a float32 activation at
# ViT-B/16's text width (512): beyond any card.
CHOICES = dict(prompts_per_chunk=Range(1, 10**6))
# On the toy world (--dataset toy, 4 + 4 layers, 12 classes x 16 shots):
# [ours], see prompts/__init__.py.
# Its batch of 1 would be 192 steps an epoch; at 16 its 4-unit meta-net (64 // 16) stalled on one
# seed of three (loss flat at 0.85, base 71), at 4 none did.
TOY = dict(epochs=10, batch_size=4)


class CustomCLIP(PromptedCLIP):
    def __init__(self, clip_model, classnames, template, cfg):
        super().__init__()
        self.clip, self.cfg = clip_model, cfg
        if cfg["prompts_per_chunk"] < 1:
            raise ValueError(f"prompts_per_chunk must be at least 1, "
                             f"got {cfg['prompts_per_chunk']}")
        self.prompt_learner = PromptLearner(clip_model, classnames, cfg["n_ctx"], cfg["ctx_init"])
        embed_dim, width = clip_model.text_projection.shape[1], clip_model.ln_final.weight.shape[0]
        # h: image feature -> one token shift [paper, Sec. 3.2]
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(embed_dim, embed_dim // 16)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(embed_dim // 16, width)),
        ]))

    def text_prompts_per_step(self, batch_size):
        # one prompt per image and class
        return batch_size * self.prompt_learner.tokenized_prompts.shape[0]

    def text_features(self):
        """Nothing to compute once: every class feature depends on the image (see logits)."""
        return None

    def logits(self, images, text_features=None):
        x = F.normalize(self.clip.encode_image(images), dim=-1)  # [B, D]
        images_per_chunk = max(
            1, self.cfg["prompts_per_chunk"] // self.prompt_learner.tokenized_prompts.shape[0]
        )
        return torch.cat([self.conditional_logits(chunk) for chunk in x.split(images_per_chunk)])

    def conditional_logits(self, x):
        """Logits [B, n_cls] of normalised image features x [B, D], each against
        its own class features."""
        # v_m(x) = v_m + pi(x): [B, M, width]
        ctx = self.prompt_learner.ctx[0] + self.meta_net(x).unsqueeze(1)
        # t_c(x): [B, n_cls, D]
        return cosine_logits(self.clip, x, self.prompt_learner.encode(self.clip, ctx=ctx))
