"""What every prompt learner here shares. Read this file first; each method
file is small on top of it.

- `PromptLearner`: CoOp's learnable context in front of the class name, as text-encoder input
  embeddings. PMPO uses N of them at once (`n_prompts`), APLe and CoOp one.
- `prompt_tokens` / `layer_dict`: learnable tokens for chosen transformer layers ("deep" prompting,
  VPT-deep / MaPLe / IVLP), handed to clip's encoders through their `deep_prompts` hook.
- `zeroshot_classifier`: class features of frozen CLIP from a hand-crafted template (the zero-shot
  baseline, PMPO's prior, APLe's teacher, KgCoOp's anchor) or a template set (PromptSRC's teacher).
- `PromptedCLIP`: the base class of each method's model (forward and the cross-entropy loss).
- `IndependentDeepPrompts`: deep prompts in both encoders, learned
  independently (IVLP, PromptSRC, APLe).
- `cosine_logits`, `kl_to_teacher`, `learned_state`: the logits every method uses, the KL to a
  frozen teacher's logits, and what a checkpoint holds.
- `Range`, `check_settings`: the allowed values of an option (a method's CHOICES), and their check.

The frozen CLIP is a submodule named `clip`; everything else a method defines is learned.
"""
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from clip.tokenizer import tokenize


# The help text of options several methods share (train.py --help); a method's own HELP adds its
# other options, or words one of these its own way.
OPTION_HELP = dict(
    lr="SGD learning rate",
    batch_size="images per step",
    epochs="training epochs (base-to-novel; other protocols: prompts.protocol_defaults)",
    n_ctx="text prompt tokens at layer 0, from ctx_init (PromptLearner: M <= "
          "4 learns its first M words)",
    ctx_init="words the text prompt starts from; '' for a random N(0, 0.02) start",
    n_ctx_vision="vision prompt tokens per layer",
    depth="layers 0..depth-1 of each encoder carry prompts",
)


class PromptedCLIP(nn.Module):
    """Base of every method's CustomCLIP: a frozen CLIP (`self.clip`) plus learned prompts.

    A method defines text_features() (class features, computed once per evaluation) and, if it
    prompts the image side, logits(images, text_features). Training minimises loss(): cross-entropy
    unless a method adds terms, over stages() (one, unless a method tunes its parts in sequence),
    and on_epoch_end() may change the learned tensors between epochs (PromptSRC's prompt averaging).

    Class features that depend on the image (CoCoOp) go through the same two calls: text_features()
    returns what can be computed once (or None), and logits() builds each image's class features.
    """

    def __init__(self):
        super().__init__()
        # loss() records its terms here, detached ({"ce": ..., "kl": ...}) for the log
        self.loss_terms = {}

    def stages(self, cfg):
        """Training as [(stage, epochs), ...]: one stage here; APLe overrides it with its three."""
        return [("all", cfg["epochs"])]

    def schedule_restarts(self, cfg):
        """Whether each stage restarts the warm-up and cosine lr schedule
        (else one runs over all)."""
        return False

    def lr_shape(self, cfg):
        """The power train.lr_at raises the cosine factor (1 + cos(pi t / T)) / 2 to: 1, the CoOp
        family's cosine; KgCoOp overrides it (its published runs' squared cosine)."""
        return 1

    def set_stage(self, stage):
        """Called as each stage starts; with one stage, everything the method
        defines stays trainable."""

    def on_epoch_end(self, epoch, epochs):
        """Called by train.py after each epoch (counted from 0) of a stage of
        `epochs`; nothing by default."""

    def text_prompts_per_step(self, batch_size):
        """How many prompts one training step sends through the text encoder (sizes the memory
        switches): n_prompts x classes for every PromptLearner. A method whose prompts depend on the
        image (CoCoOp) sends batch_size times as many and overrides this."""
        return sum(
            m.ctx.shape[0] * m.tokenized_prompts.shape[0]
            for m in self.modules()
            if isinstance(m, PromptLearner)
        )

    def logits(self, images, text_features):
        # plain CLIP image side: [B, D]
        image_features = F.normalize(self.clip.encode_image(images), dim=-1)
        return cosine_logits(self.clip, image_features, text_features)

    def forward(self, images):
        return self.logits(images, self.cached_text_features())

    def cached_text_features(self):
        """text_features(), computed once while training leaves the text side frozen (e.g. APLe's
        vision stage: at 500 classes the text encoder is most of a step). Frozen = the features need
        no gradient although gradients are on; then no step changes them. The copy is keyed on which
        parameters learn and on autocast, so a set_stage or another precision recomputes it, and
        train()/eval() (train.py calls model.train() as each epoch starts) drop it."""
        if not self.training:
            return self.text_features()
        device = self.clip.logit_scale.device.type
        key = (torch.is_grad_enabled(), torch.is_autocast_enabled(device),
               torch.get_autocast_dtype(device), tuple(p.requires_grad for p in self.parameters()))
        cached = getattr(self, "_frozen_text", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        features = self.text_features()
        # None: CoCoOp
        frozen = features is not None and torch.is_grad_enabled() and not features.requires_grad
        self._frozen_text = (key, features) if frozen else None
        return features

    def train(self, mode=True):
        self._frozen_text = None  # see cached_text_features
        return super().train(mode)

    def loss(self, images, labels):
        ce = F.cross_entropy(self(images), labels)
        self.loss_terms = {"ce": ce.detach()}
        return ce


class PromptLearner(nn.Module):
    """ "[SOS] ctx_1 ... ctx_M {classname}. [EOS]" with ctx learnable (CoOp, Zhou et
    al., IJCV 2022, Sec. 3.2).

    The prompts are tokenised once with M placeholder words ("X X X X cat."); their embeddings give
    `token_prefix` (SOS) and `token_suffix` (class name, full stop, EOS, padding), kept as buffers,
    and the learnable `ctx` [n_prompts, M, width] is spliced in between at every forward.
    Without ctx_init, ctx ~ N(0, 0.02). With ctx_init of T tokens ("a photo of a": T = 4), M = n_ctx
    always (a flag is never dropped), and ctx[0] starts from the init text:
    - M <= T: the first M tokens of ctx_init are learned and the other T - M stay in the prompt as
      fixed words: M = 2 gives "[SOS] v1 v2 of a {classname}." (MaPLe's and PromptSRC's prompt
      learners do exactly this, for M <= 4). With M = T the prompt at step 0 *is* the hand-crafted
      one.
    - M > T: the last T slots start from ctx_init and the M - T before them at random, so the init
      text still sits next to the class name [ours: MaPLe and PromptSRC start all M at random there,
      which drops ctx_init; pass ctx_init='' for that].
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
                    # its first n_ctx tokens are replaced by ctx, the rest stay
                    text_before_name = ctx_init
                else:
                    ctx[0, n_ctx - T:] = init
            # [n_cls, 77]
            tokenized = tokenize([f"{text_before_name} {name}." for name in classnames])
            # each class's end-of-text position (length_buckets)
            self.eot = tokenized.argmax(dim=-1).tolist()
            # drop the padding after the last EOT
            tokenized = tokenized[:, :max(self.eot) + 1].to(device)
            embedded = embedding(tokenized)  # [n_cls, L, width]
        self.n_ctx, self.ctx_init = n_ctx, ctx_init
        self.plans = {}  # (N, device) -> encode_by_length's plan for N prompts of every class
        self.ctx = nn.Parameter(ctx.to(device))  # [n_prompts, M, width]
        self.register_buffer("tokenized_prompts", tokenized, persistent=False)
        # SOS: [n_cls, 1, width]
        self.register_buffer("token_prefix", embedded[:, :1], persistent=False)
        # [n_cls, L-1-M, width]
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx:], persistent=False)

    def forward(self, ctx=None):
        """Prompt embeddings [N, n_cls, L, width] of the N contexts `ctx` [N, M, width] (default:
        self.ctx; CoCoOp passes one context per image)."""
        ctx = self.ctx if ctx is None else ctx
        N, M, W = ctx.shape
        C = self.token_prefix.shape[0]
        ctx = ctx.unsqueeze(1).expand(N, C, M, W)  # the same context for every class
        prefix = self.token_prefix.unsqueeze(0).expand(N, -1, -1, -1)  # [N, n_cls, 1, width]
        suffix = self.token_suffix.unsqueeze(0).expand(N, -1, -1, -1)  # [N, n_cls, L-1-M, width]
        return torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=2)

    def encode(self, clip_model, deep_prompts=None, ctx=None):
        """Normalised text features [N, n_cls, embed_dim] of every prompt (self.ctx,
        or `ctx`) for every class.

        deep_prompts {layer: [n, width]} replace positions 1..n before that layer: n may not exceed
        n_ctx, or the tokens after the context (the class name) would be overwritten.
        """
        for layer, tokens in (deep_prompts or {}).items():
            if tokens.shape[-2] > self.n_ctx:
                raise ValueError(f"a deep text prompt of {tokens.shape[-2]} tokens at layer "
                                 f"{layer} would overwrite the class name: the prompt has "
                                 f"{self.n_ctx} context slots (n_ctx)")
        emb = self(ctx)  # [N, n_cls, L, width]
        N, C = emb.shape[:2]
        text = self.tokenized_prompts.repeat(N, 1)  # [N * n_cls, L]
        key = (N, text.device)  # N: n_prompts, or CoCoOp's images; made once each
        if key not in self.plans:
            self.plans[key] = length_buckets(self.eot * N, text.device)
        features = encode_by_length(clip_model, text, emb.flatten(0, 1), deep_prompts,
                                    plan=self.plans[key])
        return F.normalize(features, dim=-1).view(N, C, -1)  # [N, n_cls, embed_dim]


class IndependentDeepPrompts(PromptedCLIP):
    """Independent vision-language deep prompts (IVLP, the baseline of MaPLe, Khattak et
    al., CVPR 2023, Sec. 4.1).

    Text: a PromptLearner context at layer 0, then fresh tokens `text_prompts` before each of layers
    1..depth-1. Vision: `vision_prompts`, appended after the patch tokens at layer 0 and replaced
    before each of layers 1..depth-1. The two sets never see each other (MaPLe couples them).
    cfg: n_ctx, ctx_init, n_ctx_vision, depth.
    """

    def __init__(self, clip_model, classnames, cfg):
        super().__init__()
        self.clip, self.cfg = clip_model, cfg
        self.prompt_learner = PromptLearner(clip_model, classnames, cfg["n_ctx"], cfg["ctx_init"])
        n_ctx, depth = self.prompt_learner.n_ctx, cfg["depth"]
        check_depth(clip_model, depth)
        # layers 1..depth-1
        self.text_prompts = prompt_tokens(depth - 1, n_ctx, clip_model.ln_final.weight.shape[0])
        self.vision_prompts = prompt_tokens(depth, cfg["n_ctx_vision"],
                                            clip_model.visual.conv1.out_channels)

    def text_features(self):
        # [n_cls, D]
        return self.prompt_learner.encode(self.clip, layer_dict(self.text_prompts, 1))[0]

    def image_features(self, images):
        return F.normalize(self.clip.encode_image(images,
                                                  deep_prompts=layer_dict(self.vision_prompts, 0)),
                                                  dim=-1)

    def logits(self, images, text_features):
        return cosine_logits(self.clip, self.image_features(images), text_features)


def check_depth(clip_model, depth):
    """Deep prompts for layers 0..depth-1 need that many layers in both encoders."""
    for encoder, layers in (("text", clip_model.transformer.layers),
                            ("vision", clip_model.visual.transformer.layers)):
        if not 1 <= depth <= layers:
            raise ValueError(f"depth must be between 1 and the {layers} layers of the "
                             f"{encoder} encoder, got {depth}")


def prompt_tokens(n_layers, n_ctx, width):
    """Learnable tokens for n_layers consecutive layers: [n_layers, n_ctx, width] ~
    N(0, 0.02) (VPT, MaPLe)."""
    return nn.Parameter(torch.empty(n_layers, n_ctx, width).normal_(std=0.02))


def layer_dict(tokens, first_layer):
    """[n_layers, n_ctx, width] -> {first_layer: tokens[0], first_layer + 1:
    tokens[1], ...} for clip's hook."""
    return {first_layer + i: t for i, t in enumerate(tokens)}


@torch.no_grad()
def zeroshot_classifier(clip_model, classnames, template, chunk=256):
    """Normalised features [n_cls, embed_dim] of template.format(name) from
    frozen CLIP (CLIP, Sec. 3.1.4).

    A list of templates averages their raw features before normalising (PromptSRC's text
    teacher). Classes go through the text encoder at most `chunk` at a time so 1,000
    ImageNet classes fit small cards.
    """
    device = clip_model.token_embedding.weight.device
    features = 0
    for t in [template] if isinstance(template, str) else template:
        text = tokenize([t.format(name) for name in classnames])  # [n_cls, 77]
        plan = length_buckets(text.argmax(dim=-1).tolist(), device, chunk)
        # [n_cls, D]
        features = features + encode_by_length(clip_model, text.to(device), plan=plan).float()
    # the mean's direction: dividing by the count changes nothing
    return F.normalize(features, dim=-1)


def encode_by_length(clip_model, text, embeddings=None, deep_prompts=None, chunk=None, plan=None):
    """clip_model.encode_text(text, embeddings, deep_prompts) in length
    buckets: features [B, embed_dim].

    encode_text cuts the whole batch after its longest prompt; every shorter prompt then still runs
    through padding that the causal mask hides from it (1,000 class-name prompts: cut at 23 tokens,
    10.3 on average, so half of the text FLOPs are padding). Here the prompts of each length run
    together, cut at their own end-of-text token, so each prompt costs its own length and no more.
    Exact in exact arithmetic, like the cut (equal to float32 rounding). Differentiable: the
    features come back in the prompts' order by indexing. deep_prompts of shape [B, n, width] are
    bucketed with their prompts. chunk: at most this many prompts per encode_text call (memory).
    plan: length_buckets(...) of these prompts, made when they were tokenized; without it the
    lengths are read back from text (on a GPU, one host sync).
    """
    buckets, restore = plan or length_buckets(text.argmax(dim=-1).tolist(), text.device, chunk)
    features = []
    for rows, length in buckets:
        prompts = {
            layer: t[rows] if t.dim() == 3 else t for layer, t in (deep_prompts or {}).items()
        }
        x = None if embeddings is None else embeddings[rows]  # [b, L, width]
        features.append(clip_model.encode_text(text[rows], embeddings=x, deep_prompts=prompts,
                                               length=length))
    return torch.cat(features)[restore]  # [B, embed_dim], back in the prompts' order


def length_buckets(eot, device, chunk=None):
    """encode_by_length's plan for prompts whose end-of-text tokens sit at `eot` (a list of ints,
    known when they were tokenized): ([(rows [b] on device, length)], one per length, split into
    chunks of at most `chunk` rows; restore [B] on device, the permutation back to the prompts'
    order). Made once per class list, so no forward reads a length back from the device."""
    order = sorted(range(len(eot)), key=eot.__getitem__)  # prompts sorted by length (a stable sort)
    buckets = []
    for length, rows in itertools.groupby(order, key=eot.__getitem__):  # one bucket per length
        rows = list(rows)
        for start in range(0, len(rows), chunk or len(rows)):
            buckets.append((torch.tensor(rows[start:start + (chunk or len(rows))], device=device),
                            length + 1))
    restore = [0] * len(order)
    for position, row in enumerate(order):
        restore[row] = position
    return buckets, torch.tensor(restore, device=device)


def cosine_logits(clip_model, image_features, text_features):
    """CLIP's logits exp(logit_scale) * cos(image, class) [B, n_cls], in
    float32 even under autocast.

    Every method's logits come from here, in training and evaluation. Under bf16 autocast a logit at
    CLIP's scale (100 x cos, e.g. 30) is rounded to steps of 0.125 to 0.25, so close classes tie and
    argmax gives the tie to the lower class index; the CoOp family evaluates in fp16, 8x finer. Here
    the features are normalised (again, if the caller did it under autocast) and multiplied in
    float32. text_features [B, n_cls, D] gives each image its own class features (CoCoOp).
    """
    with torch.autocast(image_features.device.type, enabled=False):
        image_features = F.normalize(image_features.float(), dim=-1)  # [B, D]
        text_features = F.normalize(text_features.float(), dim=-1)  # [n_cls, D] or [B, n_cls, D]
        if text_features.dim() == 3:
            return clip_model.logit_scale.exp().float() * torch.einsum("bd,bcd->bc", image_features,
                                                                       text_features)
        return clip_model.logit_scale.exp().float() * image_features @ text_features.t()


def kl_to_teacher(logits, teacher_logits, temperature=1.0, form="distill"):
    """T^2 KL(softmax(teacher / T) || softmax(logits / T)) summed over the batch and classes,
    divided by the batch size ("distill", Hinton et al. 2015; PyTorch's reduction="batchmean") or by
    batch x classes ("promptsrc": PromptSRC's L_SCL_logits, F.kl_div(..., reduction="sum") /
    logits.numel(), T = 1)."""
    T = temperature
    kl = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(teacher_logits / T, -1),
                  reduction="sum", log_target=True) * T ** 2
    return kl / (logits.shape[0] if form == "distill" else logits.numel())


def learned_state(model, buffers=False):
    """The tensors a method learns: all parameters outside the frozen CLIP (a
    checkpoint holds only these).

    buffers=True adds the persistent buffers a method carries from epoch to epoch (PromptSRC's
    running GPA sum), which resuming a run needs.
    """
    tensors = model.state_dict() if buffers else dict(model.named_parameters())
    return {k: v.detach().cpu().clone() for k, v in tensors.items() if not k.startswith("clip.")}


class Range:
    """Allowed values of a number option, for a method's CHOICES: Range(1) is "an
    integer/number >= 1", Range(0, 1) "between 0 and 1", Range(0, open_low=True) "> 0". NaN and
    infinity are never in a Range."""

    def __init__(self, low=0, high=math.inf, open_low=False):
        self.low, self.high, self.open_low = low, high, open_low

    def __contains__(self, value):
        above = value > self.low if self.open_low else value >= self.low
        return math.isfinite(value) and above and value <= self.high

    def __str__(self):
        if self.high != math.inf and self.open_low:
            return f"> {self.low} and <= {self.high}"
        if self.high != math.inf:
            return f"between {self.low} and {self.high}"
        return self.low_bound()

    def low_bound(self):
        return f"{'>' if self.open_low else '>='} {self.low}"

    def why(self, value):
        """The bound `value` misses: "> 0" for a value too low (or NaN), else the whole range."""
        return self.low_bound() if math.isnan(value) or value <= self.low else str(self)


# The allowed values of options several methods share; a method's own CHOICES adds to these or
# overrides one. Every check and --help reads {**OPTION_CHOICES, **module.CHOICES}. Each integer
# option has an upper bound, so that a typo (10**20) stops here instead of deep in torch:
# - lr at most 10: the CoOp family trains with 0.002 to 0.035 (1e308 would overflow SGD's momentum
#   buffer in the second epoch).
# - batch_size at most 4,096: the papers use 1 to 128, and 4,096 is a quarter of 16-shot ImageNet.
# - epochs at most 10,000: the papers train 2 to 200.
# - n_ctx at most 73: CLIP's 77-token context holds SOS, the context, a class name of at least one
#   token, the full stop and EOS (a longer class name leaves less room: tokenize says so).
# - n_ctx_vision at most 200: VPT's longest prompt, next to ViT-B/16's 197 image tokens.
# - depth at most 24: the deepest encoder of OpenAI's CLIPs (ViT-L/14's vision side); check_depth
#   refuses more layers than the loaded CLIP has.
OPTION_CHOICES = dict(lr=Range(0, 10, open_low=True), batch_size=Range(1, 4096),
                      epochs=Range(0, 10000), n_ctx=Range(1, 73), n_ctx_vision=Range(1, 200),
                      depth=Range(1, 24))


def describe(allowed, value=None):
    """CHOICES' values in words: ("a", "b", "c") -> "a, b or c"; a Range as itself (">= 1"), or
    the bound `value` misses."""
    if isinstance(allowed, Range):
        return str(allowed) if value is None else allowed.why(value)
    return ", ".join(allowed[:-1]) + " or " + allowed[-1]


def check_settings(cfg, defaults, choices):
    """ValueError naming the first value outside its CHOICES; a number not
    listed there must be >= 0."""
    for key, default in defaults.items():
        first = default[0] if isinstance(default, tuple) else default
        allowed = choices.get(key, Range(0) if type(first) in (int, float) else None)
        value = cfg[key]
        for v in value if isinstance(value, (tuple, list)) else [value]:
            if allowed is not None and v not in allowed:
                raise ValueError(f"--{key} must be {describe(allowed, v)} (got {v!r})")
