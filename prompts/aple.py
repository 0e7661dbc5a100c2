"""APLe: token-wise adaptive multi-modal prompt learning (Cao, Shi, Fu, Zhang, Xu. arXiv 2401.06827).

No code of the paper is public and its method section could not be read (see
../shared/docs/methods.md A1), so every line below is marked:
  [paper]  stated by the paper (abstract or the method summaries quoted in methods.md A1.1)
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
   [ours; `stage_epochs`]; KL as in PromptSRC, weight 1 [ours; `kl_weight`]; p_zs from the data
   set's hand-crafted template [ours].
3. Multi-modal token adaptation (stage II) [paper]: both prompt sets trained jointly with
   cross-entropy only, "without zero-shot guidance" [paper].

Prompts [ours, after IVLP/PromptSRC, which the paper's description matches]: independent deep prompts
in both encoders, 4 tokens each, in the first 9 layers; text tokens start from "a photo of a".
A branch's prompts join the forward pass from its first stage on, so while the language prompts
learn, the image side is plain CLIP. Optimisation [ours, PromptSRC's base-to-novel config]:
SGD lr 0.0025, batch 4, 20 epochs.
"""
import torch
import torch.nn.functional as F

from prompts.common import PromptedCLIP, PromptLearner, cosine_logits, deep_prompts, layer_dict, zeroshot_classifier

DEFAULTS = dict(
    n_ctx=4, ctx_init="a photo of a",  # text prompt (layer 0); ctx_init fixes n_ctx to its 4 tokens
    n_ctx_vision=4,                    # vision prompt tokens per layer
    depth=9,                           # layers 0..depth-1 of each encoder carry prompts
    first="language",                  # stage I order: "language" then "vision", or the reverse
    stage_epochs=(7, 7, 6),            # stage I-a, stage I-b, stage II
    kl_weight=1.0,                     # weight of KL(p_zs || p) in stage I
    adapter=True, adapter_at_test=True, sigma=0.05, alpha=0.9,
    lr=0.0025, batch_size=4,           # 20 epochs in all: the sum of stage_epochs
)


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


class CustomCLIP(PromptedCLIP):
    def __init__(self, clip_model, classnames, template, cfg):
        super().__init__()
        self.clip, self.cfg = clip_model, cfg
        self.prompt_learner = PromptLearner(clip_model, classnames, cfg["n_ctx"], cfg["ctx_init"])
        n_ctx, depth = self.prompt_learner.n_ctx, cfg["depth"]
        for encoder, layers in (("text", clip_model.transformer.layers), ("vision", clip_model.visual.transformer.layers)):
            if not 1 <= depth <= layers:
                raise ValueError(f"depth must be between 1 and the {layers} layers of the {encoder} encoder, got {depth}")
        self.text_prompts = deep_prompts(depth - 1, n_ctx, clip_model.ln_final.weight.shape[0])  # layers 1..depth-1
        self.vision_prompts = deep_prompts(depth, cfg["n_ctx_vision"], clip_model.visual.conv1.out_channels)
        self.register_buffer("zs_text_features", zeroshot_classifier(clip_model, classnames, template),
                             persistent=False)  # p_zs's class side, [n_cls, D]
        self.started = set()  # branches whose stage has begun; none = a trained model: both active
        self.use_kl = False

    # -- the stage schedule (Sec. "sequential token-wise knowledge training") -------------------
    def stages(self, cfg):
        second = "vision" if cfg["first"] == "language" else "language"
        return list(zip((cfg["first"], second, "joint"), cfg["stage_epochs"]))

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
        """A branch's prompts join the forward pass from its first stage on (all of them once trained)."""
        return self.started or {"language", "vision"}

    def text_features(self):
        if "language" not in self.active:  # before its stage: the hand-crafted prompt, i.e. zero-shot CLIP
            return self.zs_text_features
        return self.prompt_learner.encode(self.clip, layer_dict(self.text_prompts, 1))[0]  # [n_cls, D]

    def image_features(self, images):
        if self.cfg["adapter"] and (self.training or self.cfg["adapter_at_test"]):
            images = gaussian_adapter(images, self.cfg["sigma"], self.cfg["alpha"])
        prompts = layer_dict(self.vision_prompts, 0) if "vision" in self.active else None
        return F.normalize(self.clip.encode_image(images, deep_prompts=prompts), dim=-1)  # [B, D]

    def logits(self, images, text_features):
        return cosine_logits(self.clip, self.image_features(images), text_features)

    def loss(self, images, labels):
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        if self.use_kl:  # stage I: stay close to zero-shot CLIP's class probabilities p_zs
            with torch.no_grad():
                zs_image = F.normalize(self.clip.encode_image(images), dim=-1)
                zs_logits = cosine_logits(self.clip, zs_image, self.zs_text_features)
            kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(zs_logits, -1), reduction="sum",
                          log_target=True) / logits.numel()  # PromptSRC's normalisation
            loss = loss + self.cfg["kl_weight"] * kl
        return loss
