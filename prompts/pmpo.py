"""PMPO: multi-prompt with depth-partitioned cross-modal learning (Tian, Wang, Guo,
Zhu, Chen. arXiv 2305.06221).

The paper's code was never released and only its abstract could be read (docs/methods/pmpo.md says
what was, and quotes it), so every choice is marked:
  [paper]  stated by the paper's abstract or the summaries quoted in docs/methods/pmpo.md
  [ours]   our choice where the paper is silent, with the reason, each exposed as an option.

1. Multi-prompt [paper]: N learnable text prompts instead of CoOp's one. N = 4 with 4 tokens each
   [ours]; prompt 1 starts from "a photo of a", the others from N(0, 0.02) [ours, MaPLe style];
   another --n_ctx as in PromptLearner (1-3: the first words of the init, as MaPLe; more than 4: the
   init in the last 4 slots, the others random [ours]).
   Each prompt goes through the frozen text encoder for every class: N class features t_c^(i).
2. Depth partition [paper]: the vision encoder's layers are split into N contiguous partitions
   and prompt i is mapped by its own linear projection W_i (512 -> 768) [paper: "via linear
   projections"] into the vision tokens of partition i. The partitions cover layers 0..depth-1,
   depth 9 [ours, `depth`: MaPLe, the closest published relative and very likely PMPO's code base,
   prompts layers 0-8 of ViT-B/16 and lets 9-11 carry the prompt tokens forward unreplaced], split
   as equally as they go: 9 layers / 4 = {0-2}, {3-4}, {5-6}, {7-8} [ours]. The projected tokens
   replace the prompt slots at every layer of the partition [ours, `inject`, MaPLe's per-layer
   replacement] or only at its first layer (`inject="first"`). One image forward carries all N
   partitions [ours]. Cross-dataset / domain generalisation: depth 3 with 3 prompts (a layer each),
   lr 0.0026, 2 epochs [ours, MaPLe's cross-dataset config; 4 prompts cannot split 3 layers;
   prompts.protocol_defaults].
3. Prior from manual prompts [paper]: the hand-crafted template's class features t_c^hand
   (frozen CLIP, the data set's template) are fused with the learned ones, at train and test time
   [ours: so novel classes keep the anchor]:
        t_hat_c = normalize( (sum_i t_c^(i) + t_c^hand) / (N + 1) )      (`fusion="feature"`)
   or the N + 1 logit sets are averaged (`fusion="logit"`) [ours, both offered].
Loss: cross-entropy [ours: no other term is mentioned]. Optimisation [ours, MaPLe's base-to-novel
config]: SGD lr 0.0035, batch 4, 5 epochs.
"""

import torch
import torch.nn.functional as F
from torch import nn

from prompts.common import PromptedCLIP, PromptLearner, Range, cosine_logits, zeroshot_classifier

DEFAULTS = dict(n_prompts=4, n_ctx=4, ctx_init="a photo of a", depth=9, inject="every",
                fusion="feature", prior=True, lr=0.0035, batch_size=4, epochs=5)
HELP = dict(  # and prompts.common.OPTION_HELP's
    n_prompts="N: learnable text prompts, one per partition of the prompted vision layers",
    n_ctx="tokens per prompt (with ctx_init, see PromptLearner)",
    ctx_init="words prompt 1 starts from ('' for random); the others start random",
    depth="the partitions cover vision layers 0..depth-1 (MaPLe's prompt depth)",
    inject="vision tokens of a partition at every one of its layers, or only at its first",
    fusion="average the N + 1 class features, or the N + 1 logit sets",
    prior="fuse the class features of the data set's hand-crafted template",
    epochs="training epochs",
)
# + OPTION_CHOICES; a prompt per partition of the prompted layers: at most 24, as depth
CHOICES = dict(n_prompts=Range(1, 24), inject=("every", "first"), fusion=("feature", "logit"))
# On the toy world (--dataset toy, 4 + 4 layers, 12 classes x 16 shots):
# [ours], see prompts/__init__.py.
# 4 prompts over all 4 vision layers: one layer each
TOY = dict(epochs=20, batch_size=16, lr=DEFAULTS["lr"] / 2, depth=4)


def protocol_defaults(protocol, dataset, shots):
    """Cross-dataset and domain generalisation: [ours] MaPLe's cross-dataset config, depth 3,
    lr 0.0026, 2 epochs; 3 prompts over the 3 prompted layers."""
    return dict(depth=3, n_prompts=3, lr=0.0026, epochs=2) if protocol == "crossdataset" else {}


def partitions(n_layers, n):
    """Split layers 0..n_layers-1 into n contiguous, near-equal partitions: (12, 4) ->
    [[0,1,2], ..., [9,10,11]]."""
    if not 1 <= n <= n_layers:
        raise ValueError(f"n_prompts must be between 1 and the {n_layers} "
                         f"prompted layers (--depth), got {n}")
    return [chunk.tolist() for chunk in torch.arange(n_layers).tensor_split(n)]


class CustomCLIP(PromptedCLIP):
    def __init__(self, clip_model, classnames, template, cfg):
        super().__init__()
        self.clip, self.cfg = clip_model, cfg
        n = cfg["n_prompts"]
        self.prompt_learner = PromptLearner(clip_model, classnames, cfg["n_ctx"], cfg["ctx_init"],
                                            n_prompts=n)
        text_width, vision_width = (
            clip_model.ln_final.weight.shape[0],
            clip_model.visual.conv1.out_channels,
        )
        # W_i, one per partition
        self.proj = nn.ModuleList([nn.Linear(text_width, vision_width) for _ in range(n)])
        layers = clip_model.visual.transformer.layers
        if not 1 <= cfg["depth"] <= layers:
            raise ValueError(f"depth must be between 1 and the {layers} vision layers, got "
                             f"{cfg['depth']} (pass --depth {layers} or less)")
        # layers from depth on carry the last partition's tokens
        self.partitions = partitions(cfg["depth"], n)
        if cfg["prior"]:
            self.register_buffer("prior_text_features",
                                 zeroshot_classifier(clip_model, classnames, template),
                                 persistent=False)  # t^hand: [n_cls, D]

    def vision_deep_prompts(self):
        """{layer: W_i P_i} for the layers of partition i (all of them, or the first only)."""
        prompts = {}
        for i, layers in enumerate(self.partitions):
            tokens = self.proj[i](self.prompt_learner.ctx[i])  # [n_ctx, 512] -> [n_ctx, 768]
            for layer in (layers if self.cfg["inject"] == "every" else layers[:1]):
                prompts[layer] = tokens
        return prompts

    def text_features(self):
        """The N learned class-feature sets plus the prior: [N (+1), n_cls, D], in
        float32 (so are the fusions)."""
        features = self.prompt_learner.encode(self.clip).float()  # [N, n_cls, D]
        if self.cfg["prior"]:
            features = torch.cat([features, self.prior_text_features[None]])  # float32 already
        return features

    def logits(self, images, text_features):
        image_features = F.normalize(
            self.clip.encode_image(images, deep_prompts=self.vision_deep_prompts()), dim=-1
        )
        if self.cfg["fusion"] == "feature":
            return cosine_logits(self.clip, image_features,
                                 F.normalize(text_features.mean(0), dim=-1))
        return torch.stack([cosine_logits(self.clip, image_features,
                                          f) for f in text_features]).mean(0)
