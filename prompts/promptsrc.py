"""PromptSRC: Self-Regulating Prompts (Khattak, Wasim, Naseer, Khan, Yang, Khan. "Self-regulating
Prompts: Foundational Model Adaptation without Forgetting", ICCV 2023).

IVLP's independent deep prompts (4 + 4 tokens, depth 9, text from "a photo of a"), regulated by
frozen CLIP in three ways (Sec. 3.2):
1. Mutual agreement (Eq. 2-4): with f, t the prompted features and f~, t~ frozen CLIP's,
       L = CE(z, y) + lambda_1 * mean|t - t~| + lambda_2 * mean|f - f~| + KL(p~ || p)
   f~ is frozen CLIP on the same augmented images; t~ averages frozen CLIP's raw text features over
   60 ImageNet templates (`TEMPLATES`) before normalising [code: SRC trainers/promptsrc.py,
   trainers/imagenet_templates.py]; z = 100 f t^T, z~ = 100 f~ t~^T; the L1 terms average over
   elements and the KL is summed and divided by B x C [paper]. lambda_1 = 25, lambda_2 = 10 [paper].
2. Text diversity: the template set above.
3. Gaussian-weighted prompt aggregation, GPA (Eq. 5): after epoch e the learned tensors are added to
   a running sum with weight w_e proportional to N(e; mu, sigma^2), e = 1..E, and the sum replaces
   them after the last epoch, so the evaluated (and saved) prompts are the weighted average. Only
   the learned tensors are averaged, in float32 [ours: the repo sums whole fp16 state dicts, which
   also nudges frozen CLIP]. The running sum is a buffer, so a resumed run continues it.
Evaluation uses the prompted model only.

Trainable for ViT-B/16: 9 x 4 x 512 + 9 x 4 x 768 = 46,080.

Defaults: SRC (muzairkhattak/PromptSRC)
configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml [paper]: 4 + 4 tokens, depth 9, SGD lr
0.0025, batch 4, 20 epochs, text/image L1 weights 25/10, GPA mu 15, sigma 1. Where each setting
comes from, with the source files: docs/methods/promptsrc.md.
"""

import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from prompts.common import (
    IndependentDeepPrompts,
    Range,
    cosine_logits,
    kl_to_teacher,
    zeroshot_classifier,
)

DEFAULTS = dict(
    n_ctx=4, ctx_init="a photo of a",  # 4 tokens from ctx_init; '' for random N(0, 0.02)
    n_ctx_vision=4,                    # vision prompt tokens per layer
    depth=9,                           # layers 0..depth-1 of each encoder carry prompts
    text_weight=25.0, image_weight=10.0,  # lambda_1 (text L1), lambda_2 (image L1)
    gpa_mean=15.0, gpa_std=1.0,        # GPA's Gaussian over epochs 1..E
    lr=0.0025, batch_size=4, epochs=20,
)
HELP = dict(  # and prompts.common.OPTION_HELP's
    text_weight="weight of mean |t - t~| (text features vs frozen CLIP's, 60 templates)",
    image_weight="weight of mean |f - f~| (image features vs frozen CLIP's)",
    gpa_mean="GPA: mean of the Gaussian over epochs 1..E",
    gpa_std="GPA: standard deviation of that Gaussian",
)
CHOICES = dict(gpa_std=Range(0, open_low=True))  # + common.OPTION_CHOICES
# On the toy world (--dataset toy, 4 + 4 layers, 12 classes x 16 shots):
# [ours], see prompts/__init__.py.
# 20 epochs: its base-to-novel config's, so GPA's Gaussian (mean 15) stays as it is
TOY = dict(epochs=20, batch_size=16, lr=DEFAULTS["lr"] / 2, depth=3)


def protocol_defaults(protocol, dataset, shots):
    """[code] PromptSRC's configs/trainers/PromptSRC/*.yaml: GPA's Gaussian per protocol."""
    if protocol == "crossdataset":  # vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml
        return dict(depth=3, gpa_mean=6.0, gpa_std=10.0)
    # vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml, whose comments split the data sets
    if protocol == "fewshot":
        broad = dataset in ("imagenet", "caltech101", "oxford_pets", "food101", "ucf101", "sun397")
        return dict(epochs=50, gpa_mean=30.0 if broad else 45.0, gpa_std=30.0 if broad else 5.0)
    return {}

# the first 60 of CLIP's 80 ImageNet prompts, in CLIP's order (SRC trainers/imagenet_templates.py)
TEMPLATES = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering " "of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo " "of the {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the " "clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
]


def gpa_weights(epochs, mean, std):
    """w_e = N(e; mean, std^2) / sum over e = 1..epochs (the Gaussian's constant cancels; softmax
    keeps the far tails from underflowing to 0 / 0)."""
    if std <= 0:
        raise ValueError(f"gpa_std must be positive, got {std}")
    log_pdf = torch.tensor([-((e - mean) ** 2) / (2 * std ** 2) for e in range(1, epochs + 1)],
                           dtype=torch.float64)
    return log_pdf.softmax(0).tolist()


class CustomCLIP(IndependentDeepPrompts):
    def __init__(self, clip_model, classnames, template, cfg):
        # prompt_learner, text_prompts, vision_prompts
        super().__init__(clip_model, classnames, cfg)
        gpa_weights(1, cfg["gpa_mean"], cfg["gpa_std"])  # checks gpa_std before a run starts
        self.classnames_for_teacher = list(classnames)
        # t~ [n_cls, D]: 60 templates x classes text passes, made on first
        self._frozen_text_features = None
        # use [ours: only training needs them, so evaluation and the
        # novel-class model skip that cost]
        n_learned = sum(p.numel() for p in self.learned())
        # sum_e w_e theta_e
        self.register_buffer("gpa_sum", torch.zeros(n_learned, dtype=torch.float32))

    @property
    def frozen_text_features(self):
        """t~: frozen CLIP's class features averaged over TEMPLATES, [n_cls, D] (computed once)."""
        if self._frozen_text_features is None:
            self._frozen_text_features = zeroshot_classifier(self.clip, self.classnames_for_teacher,
                                                             TEMPLATES)
        return self._frozen_text_features

    def learned(self):
        return [self.prompt_learner.ctx, self.text_prompts, self.vision_prompts]

    def loss(self, images, labels):
        t = self.text_features()  # [n_cls, D]
        f = self.image_features(images)  # [B, D]
        z = cosine_logits(self.clip, f, t)
        with torch.no_grad():
            f_frozen = F.normalize(self.clip.encode_image(images), dim=-1)
            z_frozen = cosine_logits(self.clip, f_frozen, self.frozen_text_features)
        terms = dict(ce=F.cross_entropy(z, labels), kl=kl_to_teacher(z, z_frozen, 1.0, "promptsrc"),
                     text_l1=self.cfg["text_weight"] * F.l1_loss(t.float(),
                                                                 self.frozen_text_features),
                     image_l1=self.cfg["image_weight"] * F.l1_loss(f.float(), f_frozen.float()))
        self.loss_terms = {k: v.detach() for k, v in terms.items()}
        return sum(terms.values())

    @torch.no_grad()
    def on_epoch_end(self, epoch, epochs):
        """GPA: add w_e theta_e to the running sum; after the last epoch the
        sum becomes the prompts."""
        if epoch == 0:
            self.gpa_sum.zero_()
        w = gpa_weights(epochs, self.cfg["gpa_mean"], self.cfg["gpa_std"])[epoch]
        self.gpa_sum += w * parameters_to_vector(self.learned()).float()
        if epoch == epochs - 1:
            params = self.learned()
            for p, average in zip(params, self.gpa_sum.split([p.numel() for p in params])):
                p.copy_(average.view_as(p))
