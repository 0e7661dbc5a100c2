"""CoOp: Context Optimization (Zhou, Yang, Loy, Liu. "Learning to Prompt for
Vision-Language Models", IJCV 2022).

The smallest prompt learner, and the pattern the others follow. The hand-written prompt
"a photo of a {class}." becomes "[ctx_1] ... [ctx_M] {class}." where the M context vectors live in
the word-embedding space and are learned by back-propagating the cross-entropy of CLIP's own
logits through the frozen text encoder (Sec. 3.2, Eq. 2). The image side is CLIP unchanged.

Trainable: ctx, M x 512 for ViT-B/16 (2,048 with M = 4).

Settings follow CoOp's own configs and scripts [paper; docs/methods/coop.md lists each source]:
- base-to-novel (the CoCoOp paper's CoOp runs, config `vit_b16_ctxv1`): 4 tokens from "a photo of
  a", SGD lr 0.002, batch 32, 200 epochs; ImageNet 50 (`vit_b16_ep50_ctxv1`);
- few-shot (COOP.md, "CLIP + CoOp (M=16, end)"): 16 random tokens; 50 epochs for 1 shot, 100 for 2
  to 4 shots, 200 for 8 to 16; ImageNet 50 in every setting;
- cross-dataset / domain generalisation: trained on ImageNet, so 50 epochs.
The protocol- and data-set-dependent values live in prompts.protocol_defaults; a flag given wins.
--n_ctx with ctx_init: see PromptLearner (M <= 4 learns the first M words of "a photo of a", as
MaPLe and PromptSRC; M > 4 starts the last 4 slots from them and the rest at random).
"""
from prompts.common import PromptedCLIP, PromptLearner

DEFAULTS = dict(n_ctx=4, ctx_init="a photo of a", lr=0.002, batch_size=32, epochs=200)
HELP = dict(  # and prompts.common.OPTION_HELP's
    n_ctx="context tokens M (with ctx_init, see PromptLearner: M <= 4 learns its first M words)",
    ctx_init="words the context starts from; '' for a random N(0, 0.02) start",
)
CHOICES = {}  # prompts.common.OPTION_CHOICES has this method's options
# On the toy world (--dataset toy, 4 + 4 layers, 12 classes x 16 shots):
# [ours], see prompts/__init__.py.
TOY = dict(epochs=20, batch_size=16, lr=DEFAULTS["lr"] / 2)


def protocol_defaults(protocol, dataset, shots):
    """What CoOp's configs change for this protocol, data set and K [paper: its configs vit_b16
    (200 epochs), vit_b16_ep100, vit_b16_ep50]."""
    imagenet = dataset == "imagenet"
    # [paper] COOP.md: "CLIP + CoOp (M=16, end)", ImageNet *_ep50 "for all settings"
    if protocol == "fewshot":
        return dict(n_ctx=16, ctx_init="",
                    epochs=50 if imagenet or shots <= 1 else 100 if shots <= 4 else 200)
    # [paper] base-to-novel on ImageNet: vit_b16_ep50_ctxv1
    return dict(epochs=50) if imagenet else {}


class CustomCLIP(PromptedCLIP):
    def __init__(self, clip_model, classnames, template, cfg):
        super().__init__()
        self.clip = clip_model  # frozen
        self.prompt_learner = PromptLearner(clip_model, classnames, cfg["n_ctx"], cfg["ctx_init"])

    def text_features(self):
        return self.prompt_learner.encode(self.clip)[0]  # [n_cls, D]
