"""CoOp: Context Optimization (Zhou, Yang, Loy, Liu. "Learning to Prompt for Vision-Language Models", IJCV 2022).

The smallest prompt learner, and the pattern the others follow. The hand-written prompt
"a photo of a {class}." becomes "[ctx_1] ... [ctx_M] {class}." where the M context vectors live in
the word-embedding space and are learned by back-propagating the cross-entropy of CLIP's own
logits through the frozen text encoder (Sec. 3.2, Eq. 2). The image side is CLIP unchanged.

Trainable: ctx, M x 512 for ViT-B/16 (2,048 with M = 4).

Defaults are the base-to-novel setting of the CoCoOp paper's CoOp runs (config `vit_b16_ctxv1` in
the CoOp repo): 4 tokens from "a photo of a", SGD lr 0.002, batch 32, 200 epochs [stated by the
CoOp/CoCoOp code]. The CoOp paper's few-shot table used 16 random tokens; pass --n_ctx 16 --ctx_init ''.
"""
from prompts.common import PromptedCLIP, PromptLearner

DEFAULTS = dict(
    n_ctx=4,                 # context tokens M (ignored when ctx_init is set: M = its token count)
    ctx_init="a photo of a", # '' for random N(0, 0.02) init
    lr=0.002, batch_size=32, epochs=200,
)


class CustomCLIP(PromptedCLIP):
    def __init__(self, clip_model, classnames, template, cfg):
        super().__init__()
        self.clip = clip_model  # frozen
        self.prompt_learner = PromptLearner(clip_model, classnames, cfg["n_ctx"], cfg["ctx_init"])

    def text_features(self):
        return self.prompt_learner.encode(self.clip)[0]  # [n_cls, D]
