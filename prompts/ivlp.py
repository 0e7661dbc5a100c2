"""IVLP: Independent Vision-Language Prompting, the baseline of MaPLe (Khattak, Rasheed, Maaz, Khan,
Khan. "MaPLe: Multi-modal Prompt Learning", CVPR 2023, Sec. 4.1 and Table 1).

Deep prompts in both encoders, learned independently: MaPLe without its coupling functions. The
text side is MaPLe's: "[SOS] v_1 v_2 of a {class}. [EOS]", v_1 v_2 starting from "a photo" and
"of a" kept as fixed words, then 2 fresh tokens before each of the next layers [code: MPL
trainers/independentVL.py]. The vision side appends 2 tokens after the patch tokens and
replaces them before each of the next layers, up to `depth`
(prompts.common.IndependentDeepPrompts). Cross-entropy only.

Trainable for ViT-B/16 at the default depth 12: 12 x 2 x 512 + 12 x 2 x 768 = 30,720.

Defaults: MPL (muzairkhattak/multimodal-prompt-learning)
configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml [paper]: 2 + 2 tokens, SGD lr 0.0035, batch
4, 5 epochs, and depth 12 (PROMPT_DEPTH_TEXT and PROMPT_DEPTH_VISION: 12, all layers), so a table
made with the defaults follows the official config. --depth 9 [ours, an option]: MPL train.py's
default and MaPLe's depth, so IVLP is MaPLe minus the coupling (9 x 2 x 512 + 9 x 2 x 768 = 23,040
values). PromptSRC's IVLP row is 4 + 4 tokens at depth 9 (PromptSRC repo
configs/trainers/IVLP/vit_b16_c2_ep20_batch4_4+4ctx.yaml: --n_ctx 4 --n_ctx_vision 4 --lr 0.0025
--epochs 20 --depth 9). Where each setting comes from, with the source files: docs/methods/ivlp.md.
"""
from prompts.common import IndependentDeepPrompts

DEFAULTS = dict(
    # learn the first 2 tokens of ctx_init; "of a" stays ('' for random)
    n_ctx=2, ctx_init="a photo of a",
    n_ctx_vision=2,                    # vision prompt tokens per layer
    depth=12,                          # layers 0..depth-1 of each encoder: all 12 of ViT-B/16
    lr=0.0035, batch_size=4, epochs=5,
)
HELP = {}  # prompts.common.OPTION_HELP has this method's options
CHOICES = {}  # prompts.common.OPTION_CHOICES has this method's options
# On the toy world (--dataset toy, 4 + 4 layers, 12 classes x 16 shots):
# [ours], see prompts/__init__.py.
TOY = dict(epochs=20, batch_size=16, lr=DEFAULTS["lr"] / 2, depth=3)


class CustomCLIP(IndependentDeepPrompts):
    def __init__(self, clip_model, classnames, template, cfg):
        # n_ctx = 2 of ctx_init's 4 tokens: "of a" stays
        super().__init__(clip_model, classnames, cfg)
