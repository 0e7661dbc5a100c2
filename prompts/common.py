"""What every prompt learner here shares. Read this file first; each method file is small on top of it.

- `PromptLearner`: CoOp's learnable context in front of the class name, as text-encoder input
  embeddings. PMPO uses N of them at once (`n_prompts`), APLe and CoOp one.
- `deep_prompts` / `layer_dict`: learnable tokens for chosen transformer layers ("deep" prompting,
  VPT-deep / MaPLe / IVLP), handed to clip's encoders through their `deep_prompts` hook.
- `zeroshot_classifier`: class features of frozen CLIP from a hand-crafted template (the zero-shot
  baseline, PMPO's prior, APLe's teacher).
- `PromptedCLIP`: the base class of each method's model (forward and the cross-entropy loss).
- `cosine_logits`, `learned_state`: the logits every method uses, and what a checkpoint holds.
- `Range`, `check_settings`: the allowed values of an option (a method's CHOICES), and their check.

The frozen CLIP is a submodule named `clip`; everything else a method defines is learned.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from clip.tokenizer import tokenize


class PromptedCLIP(nn.Module):
    """Base of every method's CustomCLIP: a frozen CLIP (`self.clip`) plus learned prompts.

    A method defines text_features() (class features, computed once per evaluation) and, if it
    prompts the image side, logits(images, text_features). Training minimises loss(): cross-entropy
    unless a method adds terms, over stages() (one, unless a method tunes its parts in sequence).
    """

    def __init__(self):
        super().__init__()
        self.loss_terms = {}  # loss() records its terms here, detached ({"ce": ..., "kl": ...}) for the log

    def stages(self, cfg):
        """Training as [(stage, epochs), ...]: one stage here; APLe overrides it with its three."""
        return [("all", cfg["epochs"])]

    def set_stage(self, stage):
        """Called as each stage starts; with one stage, everything the method defines stays trainable."""

    def text_prompts_per_step(self, batch_size):
        """How many prompts one training step sends through the text encoder (sizes the memory switches):
        n_prompts x classes for every PromptLearner. A method whose prompts depend on the image (CoCoOp)
        sends batch_size times as many and overrides this."""
        return sum(m.ctx.shape[0] * m.tokenized_prompts.shape[0] for m in self.modules() if isinstance(m, PromptLearner))

    def logits(self, images, text_features):
        image_features = F.normalize(self.clip.encode_image(images), dim=-1)  # plain CLIP image side: [B, D]
        return cosine_logits(self.clip, image_features, text_features)

    def forward(self, images):
        return self.logits(images, self.text_features())

    def loss(self, images, labels):
        ce = F.cross_entropy(self(images), labels)
        self.loss_terms = {"ce": ce.detach()}
        return ce


class PromptLearner(nn.Module):
    """"[SOS] ctx_1 ... ctx_M {classname}. [EOS]" with ctx learnable (CoOp, Zhou et al., IJCV 2022, Sec. 3.2).

    The prompts are tokenised once with M placeholder words ("X X X X cat."); their embeddings give
    `token_prefix` (SOS) and `token_suffix` (class name, full stop, EOS, padding), kept as buffers,
    and the learnable `ctx` [n_prompts, M, width] is spliced in between at every forward.
    Without ctx_init, ctx ~ N(0, 0.02). With ctx_init of T tokens ("a photo of a": T = 4), M = n_ctx
    always (a flag is never dropped), and ctx[0] starts from the init text:
    - M <= T: the first M tokens of ctx_init are learned and the other T - M stay in the prompt as
      fixed words: M = 2 gives "[SOS] v1 v2 of a {classname}." (MaPLe's and PromptSRC's prompt learners
      do exactly this, for M <= 4). With M = T the prompt at step 0 *is* the hand-crafted one.
    - M > T: the last T slots start from ctx_init and the M - T before them at random, so the init text
      still sits next to the class name [ours: MaPLe and PromptSRC start all M at random there, which
      drops ctx_init; pass ctx_init='' for that].
    """

    def __init__(self, clip_model, classnames, n_ctx=4, ctx_init="", n_prompts=1):
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
        embedding = clip_model.token_embedding
        device = embedding.weight.device
        ctx = torch.empty(n_prompts, n_ctx, embedding.embedding_dim).normal_(std=0.02)
        text_before_name = " ".join(["X"] * n_ctx)  # placeholders, replaced by ctx
        with torch.no_grad():
            if ctx_init:
                init_ids = tokenize(ctx_init)  # [1, 77]
                T = int(init_ids.argmax(-1)) - 1  # tokens between SOS and EOS
                init = embedding(init_ids.to(device))[0, 1:1 + T].cpu()  # [T, width]
                if n_ctx <= T:
                    ctx[0] = init[:n_ctx]
                    text_before_name = ctx_init  # its first n_ctx tokens are replaced by ctx, the rest stay
                else:
                    ctx[0, n_ctx - T:] = init
            tokenized = tokenize([f"{text_before_name} {name}." for name in classnames]).to(device)  # [n_cls,77]
            tokenized = tokenized[:, :int(tokenized.argmax(-1).max()) + 1]  # drop the padding after the last EOT
            embedded = embedding(tokenized)  # [n_cls, L, width]
        self.n_ctx, self.ctx_init = n_ctx, ctx_init
        self.ctx = nn.Parameter(ctx.to(device))  # [n_prompts, M, width]
        self.register_buffer("tokenized_prompts", tokenized, persistent=False)
        self.register_buffer("token_prefix", embedded[:, :1], persistent=False)  # SOS: [n_cls, 1, width]
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx:], persistent=False)  # [n_cls, L-1-M, width]

    def forward(self):
        """Prompt embeddings [n_prompts, n_cls, L, width]."""
        N, M, W = self.ctx.shape
        C = self.token_prefix.shape[0]
        ctx = self.ctx.unsqueeze(1).expand(N, C, M, W)  # the same context for every class
        prefix = self.token_prefix.unsqueeze(0).expand(N, -1, -1, -1)  # [N, n_cls, 1, width]
        suffix = self.token_suffix.unsqueeze(0).expand(N, -1, -1, -1)  # [N, n_cls, L-1-M, width]
        return torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=2)

    def encode(self, clip_model, deep_prompts=None):
        """Normalised text features [n_prompts, n_cls, embed_dim] of every prompt for every class.

        deep_prompts {layer: [n, width]} replace positions 1..n before that layer: n may not exceed n_ctx,
        or the tokens after the context (the class name) would be overwritten.
        """
        for layer, tokens in (deep_prompts or {}).items():
            if tokens.shape[-2] > self.n_ctx:
                raise ValueError(f"a deep text prompt of {tokens.shape[-2]} tokens at layer {layer} would "
                                 f"overwrite the class name: the prompt has {self.n_ctx} context slots (n_ctx)")
        emb = self()  # [N, n_cls, L, width]
        N, C = emb.shape[:2]
        text = self.tokenized_prompts.repeat(N, 1)  # [N * n_cls, L]
        features = clip_model.encode_text(text, embeddings=emb.flatten(0, 1), deep_prompts=deep_prompts)
        return F.normalize(features, dim=-1).view(N, C, -1)  # [N, n_cls, embed_dim]


def deep_prompts(n_layers, n_ctx, width):
    """Learnable tokens for n_layers consecutive layers: [n_layers, n_ctx, width] ~ N(0, 0.02) (VPT, MaPLe)."""
    return nn.Parameter(torch.empty(n_layers, n_ctx, width).normal_(std=0.02))


def layer_dict(tokens, first_layer):
    """[n_layers, n_ctx, width] -> {first_layer: tokens[0], first_layer + 1: tokens[1], ...} for clip's hook."""
    return {first_layer + i: t for i, t in enumerate(tokens)}


@torch.no_grad()
def zeroshot_classifier(clip_model, classnames, template, chunk=256):
    """Normalised features [n_cls, embed_dim] of template.format(name) from frozen CLIP (CLIP, Sec. 3.1.4).

    Classes go through the text encoder `chunk` at a time so 1,000 ImageNet classes fit small cards.
    """
    device = clip_model.token_embedding.weight.device
    text = tokenize([template.format(name) for name in classnames]).to(device)  # [n_cls, 77]
    features = torch.cat([clip_model.encode_text(t) for t in text.split(chunk)])
    return F.normalize(features.float(), dim=-1)


def cosine_logits(clip_model, image_features, text_features):
    """CLIP's logits exp(logit_scale) * cos(image, class) [B, n_cls], in float32 even under autocast.

    Every method's logits come from here, in training and evaluation. Under bf16 autocast a logit at
    CLIP's scale (100 x cos, e.g. 30) is rounded to steps of 0.125 to 0.25, so close classes tie and
    argmax gives the tie to the lower class index; the CoOp family evaluates in fp16, 8x finer.
    Here the features are normalised (again, if the caller did it under autocast) and multiplied in float32.
    """
    with torch.autocast(image_features.device.type, enabled=False):
        image_features = F.normalize(image_features.float(), dim=-1)  # [B, D]
        text_features = F.normalize(text_features.float(), dim=-1)  # [n_cls, D]
        return clip_model.logit_scale.exp().float() * image_features @ text_features.t()


def learned_state(model):
    """The tensors a method learns: all parameters outside the frozen CLIP (a checkpoint holds only these)."""
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if not k.startswith("clip.")}


class Range:
    """Allowed values of a number option, for a method's CHOICES: Range(1) is "an integer/number >= 1",
    Range(0, 1) "between 0 and 1", Range(0, open_low=True) "> 0". NaN and infinity are never in a Range."""

    def __init__(self, low=0, high=math.inf, open_low=False):
        self.low, self.high, self.open_low = low, high, open_low

    def __contains__(self, value):
        above = value > self.low if self.open_low else value >= self.low
        return math.isfinite(value) and above and value <= self.high

    def __str__(self):
        if self.high != math.inf:
            return f"between {self.low} and {self.high}"
        return f"{'>' if self.open_low else '>='} {self.low}"


def describe(allowed):
    """CHOICES' values in words: ("a", "b", "c") -> "a, b or c"; a Range as itself (">= 1")."""
    return str(allowed) if isinstance(allowed, Range) else ", ".join(allowed[:-1]) + " or " + allowed[-1]


def check_settings(cfg, defaults, choices):
    """ValueError naming the first value outside its CHOICES; a number not listed there must be >= 0."""
    for key, default in defaults.items():
        first = default[0] if isinstance(default, tuple) else default
        allowed = choices.get(key, Range(0) if type(first) in (int, float) else None)
        value = cfg[key]
        for v in value if isinstance(value, (tuple, list)) else [value]:
            if allowed is not None and v not in allowed:
                raise ValueError(f"--{key} must be {describe(allowed)} (got {v!r})")
