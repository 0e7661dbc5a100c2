"""What every prompt learner here shares. Read this file first; each method file is small on top of it.

- `PromptLearner`: CoOp's learnable context in front of the class name, as text-encoder input
  embeddings. PMPO uses N of them at once (`n_prompts`), APLe and CoOp one.
- `deep_prompts` / `layer_dict`: learnable tokens for chosen transformer layers ("deep" prompting,
  VPT-deep / MaPLe / IVLP), handed to clip's encoders through their `deep_prompts` hook.
- `zeroshot_classifier`: class features of frozen CLIP from a hand-crafted template (the zero-shot
  baseline, PMPO's prior, APLe's teacher).
- `PromptedCLIP`: the base class of each method's model (forward and the cross-entropy loss).
- `cosine_logits`, `learned_state`: the logits every method uses, and what a checkpoint holds.

The frozen CLIP is a submodule named `clip`; everything else a method defines is learned.
"""
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
        return F.cross_entropy(self(images), labels)


class PromptLearner(nn.Module):
    """"[SOS] ctx_1 ... ctx_M {classname}. [EOS]" with ctx learnable (CoOp, Zhou et al., IJCV 2022, Sec. 3.2).

    The prompts are tokenised once with M placeholder words ("X X X X cat."); their embeddings give
    `token_prefix` (SOS) and `token_suffix` (class name, full stop, EOS, padding), kept as buffers,
    and the learnable `ctx` [n_prompts, M, width] is spliced in between at every forward.
    ctx_init ("a photo of a") sets M to its number of tokens and starts ctx[0] from their
    embeddings, so at step 0 the prompt *is* the hand-crafted one; otherwise ctx ~ N(0, 0.02).
    """

    def __init__(self, clip_model, classnames, n_ctx=4, ctx_init="", n_prompts=1):
        super().__init__()
        embedding = clip_model.token_embedding
        if ctx_init:
            n_ctx = int(tokenize(ctx_init).argmax(-1)) - 1  # tokens between SOS and EOS
        ctx = torch.empty(n_prompts, n_ctx, embedding.embedding_dim).normal_(std=0.02)
        device = embedding.weight.device
        with torch.no_grad():
            if ctx_init:
                ctx[0] = embedding(tokenize(ctx_init).to(device))[0, 1:1 + n_ctx].cpu()
            placeholder = " ".join(["X"] * n_ctx)
            tokenized = tokenize([f"{placeholder} {name}." for name in classnames]).to(device)  # [n_cls, 77]
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
        """Normalised text features [n_prompts, n_cls, embed_dim] of every prompt for every class."""
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
    """CLIP's logits: exp(logit_scale) * cos(image, class). Both feature sets already L2-normalised."""
    return clip_model.logit_scale.exp() * image_features @ text_features.t()


def learned_state(model):
    """The tensors a method learns: all parameters outside the frozen CLIP (a checkpoint holds only these)."""
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if not k.startswith("clip.")}
