"""APLe: token-wise adaptive multi-modal prompt learning (Cao, Shi, Fu,
Zhang, Xu. arXiv 2401.06827).

No code of the paper is public and its method section could not be read (docs/methods/aple.md says
what was, and quotes it), so every line below is marked:
  [paper]  stated by the paper: its abstract, or the third-party summaries quoted in
           docs/methods/aple.md
  [ours]   our choice where the paper is silent, with the reason, each exposed as an option.

The three parts, as the paper names them:
1. Gaussian filter image adapter [paper]: I' = G(F(I)) with F the 2-D FFT and G a Gaussian low-pass,
   blended back: I_bar = alpha * I + (1 - alpha) * F^-1(I'), sigma = 0.05, alpha = 0.9 [paper].
   The mask lives on normalised frequencies in [-0.5, 0.5) and peaks at 1 [ours: sigma = 0.05 only
   means something on that grid, and the 1/(2 pi sigma^2) constant would rescale the image].
   Used at train and test time [ours; `adapter_at_test`].
2. Sequential token-wise knowledge training (stage I) [paper]: the language prompts and the vision
   prompts are learned one after the other, each with cross-entropy plus KL to zero-shot CLIP's
   class probabilities p_zs [paper]. Language first [ours; `first`], epochs split 7 / 7 / 6 of 20
   [ours; `stage_epochs`]; p_zs from the data set's hand-crafted template, zero-shot CLIP seeing the
   image as it is, without the adapter [ours; `teacher_input`: p_zs is zero-shot CLIP's prediction,
   and zero-shot CLIP has no adapter; "filtered" gives the teacher the student's input, as PromptSRC
   does].
   The KL [ours; `kl_form`, `kl_temperature`, `kl_weight`]:
        KL = T^2 * sum_c p_zs,c^T (log p_zs,c^T - log p_c^T) / norm,   p^T = softmax(logits / T)
   with norm = batch size ("distill", the form of knowledge distillation, Hinton et al. 2015: a sum
   over classes, a mean over the batch) or batch x classes ("promptsrc", PromptSRC's L_SCL_logits).
   Default "distill", T = 1, weight 1: in APLe the KL is the only regulariser of stage I, and
   PromptSRC's division by the classes makes it C times weaker (500 ImageNet base classes: stage I
   is cross-entropy alone), where PromptSRC has two L1 terms (weights 25 and 10) to regularise.
3. Multi-modal token adaptation (stage II) [paper]: both prompt sets trained jointly with
   cross-entropy only, "without zero-shot guidance" [paper].

Prompts [ours, after IVLP/PromptSRC, which the paper's description matches]: independent deep
prompts in both encoders, 4 tokens each, in the first 9 layers; text tokens start from "a photo of
a". Another --n_ctx is never ignored (PromptLearner): 1 to 3 tokens learn the first words of the
init and keep the rest as text, exactly as PromptSRC's prompt learner; more than 4 keep the init
words in the last 4 slots and start the others at random [ours: PromptSRC drops the init there,
which would silently drop a flag; --ctx_init '' gives its behaviour]. The deep text prompts have
n_ctx tokens. A branch's prompts join the forward pass from its first stage on, so while the
language prompts learn, the image side is plain CLIP. Optimisation [ours, PromptSRC's base-to-novel
config]: SGD lr 0.0025, batch 4, 20 epochs, under ONE warm-up epoch and ONE cosine over all 20
epochs [ours; `stage_schedule="one"`]: the lr curve is then PromptSRC's run exactly, only the
trained branch changes at each stage. "restart" gives each stage its own warm-up and cosine instead;
it spends 3 of 20 epochs at the warm-up lr and trains the epoch that makes the evaluated model at a
quarter of the lr (train.py warns when a stage has no epoch after its warm-up). Cross-dataset /
domain generalisation: depth 3 in both encoders [ours, PromptSRC's cross-dataset config;
prompts.protocol_defaults].
"""

import torch
import torch.nn.functional as F

from prompts.common import (OPTION_CHOICES, IndependentDeepPrompts, Range, check_settings,
                            cosine_logits, kl_to_teacher, layer_dict, zeroshot_classifier)

DEFAULTS = dict(n_ctx=4, ctx_init="a photo of a", n_ctx_vision=4, depth=9, first="language",
                stage_epochs=(7, 7, 6), kl_weight=1.0, kl_form="distill", kl_temperature=1.0,
                teacher_input="raw", stage_schedule="one", adapter=True, adapter_at_test=True,
                sigma=0.05, alpha=0.9, lr=0.0025, batch_size=4)
HELP = dict(  # and prompts.common.OPTION_HELP's
    n_ctx="text prompt tokens at layer 0, from ctx_init (see PromptLearner)",
    ctx_init="words the text prompt starts from ('' for random)",
    first="stage I order: this branch first, then the other",
    stage_epochs="epochs of stage I-a, stage I-b and stage II (20 in all by default)",
    kl_weight="weight of KL(p_zs || p) to zero-shot CLIP in stage I",
    kl_form="KL / batch (distill), or / (batch x classes) (promptsrc)",
    kl_temperature="T of the KL (T^2 keeps its gradient scale)",
    teacher_input="p_zs from the raw image, or the adapter's filtered one",
    stage_schedule="one warm-up + cosine over all stages, or restart them at each stage",
    adapter="Gaussian filter image adapter",
    adapter_at_test="the adapter at test time too",
    sigma="the adapter's Gaussian width, on frequencies in [-0.5, 0.5)",
    alpha="I_bar = alpha * I + (1 - alpha) * lowpass(I)",
)
# + common.OPTION_CHOICES
CHOICES = dict(first=("language", "vision"), kl_form=("distill", "promptsrc"),
               kl_temperature=Range(0, open_low=True), teacher_input=("raw", "filtered"),
               stage_schedule=("one", "restart"), sigma=Range(0, open_low=True), alpha=Range(0, 1),
               stage_epochs=OPTION_CHOICES["epochs"])  # each stage, as --epochs
# On the toy world (--dataset toy, 4 + 4 layers, 12 classes x 16 shots):
# [ours], see prompts/__init__.py.
# depth 9 of 12 -> 3 of 4
TOY = dict(stage_epochs=(6, 6, 8), depth=3, batch_size=16, lr=DEFAULTS["lr"] / 2)


def protocol_defaults(protocol, dataset, shots):
    """Cross-dataset and domain generalisation train ImageNet's prompts once for every target:
    [ours] PromptSRC's cross-dataset config, depth 3/3 (20 epochs, lr 0.0025: as here)."""
    return dict(depth=3) if protocol == "crossdataset" else {}


def gaussian_adapter(images, sigma=0.05, alpha=0.9):
    """alpha * I + (1 - alpha) * lowpass(I), per channel (the paper's image adapter).

    Applied to CLIP-normalised images: the filter is linear with gain 1 at frequency 0, so it
    commutes with the per-channel (x - mean) / std and the result equals filtering raw RGB first.
    """
    H, W = images.shape[-2:]
    fy = torch.fft.fftfreq(H, device=images.device)  # [-0.5, 0.5) in FFT order, DC at index 0
    fx = torch.fft.fftfreq(W, device=images.device)
    mask = torch.exp(-(fy[:, None] ** 2 + fx[None, :] ** 2) / (2 * sigma ** 2))  # [H, W], 1 at DC
    low = torch.fft.ifft2(torch.fft.fft2(images.float()) * mask).real
    return (alpha * images.float() + (1 - alpha) * low).to(images.dtype)


class CustomCLIP(IndependentDeepPrompts):
    def __init__(self, clip_model, classnames, template, cfg):
        # as train.py does; for direct use
        check_settings(cfg, DEFAULTS, {**OPTION_CHOICES, **CHOICES})
        self.stages(cfg)  # a stage_epochs of the wrong length: refused here, before any run folder
        # prompt_learner, text_prompts, vision_prompts
        super().__init__(clip_model, classnames, cfg)
        self.register_buffer("zs_text_features",
                             zeroshot_classifier(clip_model, classnames, template),
                             persistent=False)  # p_zs's class side, [n_cls, D]
        self.started = set()  # branches whose stage has begun; none = a trained model: both active
        self.use_kl = False

    # -- the stage schedule (Sec. "sequential token-wise knowledge training") -------------------
    def stages(self, cfg):
        names = (cfg["first"], "vision" if cfg["first"] == "language" else "language", "joint")
        if len(cfg["stage_epochs"]) != len(names):  # never a dropped (or an invented) stage
            raise ValueError(f"stage_epochs must give the epochs of {len(names)} stages "
                             f"({', '.join(names)}), got {tuple(cfg['stage_epochs'])}")
        return list(zip(names, cfg["stage_epochs"], strict=True))

    def schedule_restarts(self, cfg):
        return cfg["stage_schedule"] == "restart"  # [ours; default "one"], see the header

    def set_stage(self, stage):
        """Train only `stage`'s branch; stages "language"/"vision" add the KL to zero-shot CLIP."""
        trained = {"language", "vision"} if stage == "joint" else {stage}
        self.started |= trained
        for p in (self.prompt_learner.ctx, self.text_prompts):
            p.requires_grad_("language" in trained)
        self.vision_prompts.requires_grad_("vision" in trained)
        self.use_kl = stage != "joint"

    # -- forward ----------------------------------------------------------------------------------
    @property
    def active(self):
        """A branch's prompts join the forward pass from its first stage on (all
        of them once trained)."""
        return self.started or {"language", "vision"}

    def text_features(self):
        # before its stage: the hand-crafted prompt, i.e. zero-shot CLIP
        if "language" not in self.active:
            return self.zs_text_features
        return super().text_features()  # [n_cls, D]

    def adapt(self, images):
        """The image adapter, where it applies (training; test too with adapter_at_test)."""
        if self.cfg["adapter"] and (self.training or self.cfg["adapter_at_test"]):
            return gaussian_adapter(images, self.cfg["sigma"], self.cfg["alpha"])
        return images

    def image_features(self, images):
        prompts = layer_dict(self.vision_prompts, 0) if "vision" in self.active else None
        # [B, D]
        return F.normalize(self.clip.encode_image(self.adapt(images), deep_prompts=prompts), dim=-1)

    def loss(self, images, labels):
        logits = self(images)
        ce = F.cross_entropy(logits, labels)
        self.loss_terms = {"ce": ce.detach()}
        if not self.use_kl:
            return ce
        with torch.no_grad():  # stage I: stay close to zero-shot CLIP's class probabilities p_zs
            teacher_images = (
                self.adapt(images) if self.cfg["teacher_input"] == "filtered" else images
            )
            zs_image = F.normalize(self.clip.encode_image(teacher_images), dim=-1)  # [B, D]
            zs_logits = cosine_logits(self.clip, zs_image, self.zs_text_features)  # [B, n_cls]
        kl = kl_to_teacher(logits, zs_logits, self.cfg["kl_temperature"], self.cfg["kl_form"])
        self.loss_terms["kl"] = kl.detach()
        return ce + self.cfg["kl_weight"] * kl
