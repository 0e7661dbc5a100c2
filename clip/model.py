"""CLIP's ViT image encoder and causal text transformer, written from scratch.

Parameter names are OpenAI's (`visual.conv1.weight`, `transformer.resblocks.0.attn.in_proj_weight`,
...), so their checkpoints load with `load_state_dict(strict=True)` and every downstream repo's
key names still apply. The numbers are OpenAI's to float32 rounding (tests/test_parity.py checks
this against an independent implementation).

The modules behave as OpenAI's too, so code written against openai/CLIP's modules (CoOp's and
MaPLe's TextEncoder: `x = clip_model.transformer(x.permute(1, 0, 2))`, loops over
`transformer.resblocks`, `visual.conv1`/`ln_pre`/...) gets the numbers `encode_text` and
`encode_image` give: `transformer(x)` and every block take OpenAI's [L, B, width] layout, and the
text blocks carry OpenAI's causal `attn_mask` (built by `build_attention_mask`).

Inside the encoders, four things differ from openai/CLIP's model.py, none changes a result:
- the blocks run batch-first (`forward_nld`) and attention goes through
  `F.scaled_dot_product_attention` (fused kernels on GPU; the causal mask as `is_causal`);
- encode_text cuts the sequence after the batch's last end-of-text token (see encode_text);
- the last block computes only the row the features are read from (end-of-text, CLS), since no
  other row of its output is used (see Transformer.forward_nld);
- both encoders take `deep_prompts`, the hook the prompt-learning methods use to put learnable
  tokens into chosen layers (VPT / MaPLe / IVLP style) without forking the transformer blocks.
"""
import contextlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, so a model cast to fp16 keeps stable
    statistics (as OpenAI's)."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """CLIP's GELU approximation x * sigmoid(1.702 x). Using nn.GELU instead
    changes every feature."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names
    (in_proj_*, out_proj)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False, mask=None, query=None):
        """x: [B, L, D]. causal: each token sees itself and the tokens before it. mask: an additive
        float mask [L, L] (0 = attend, -inf = not), for masks other than the causal one; with query,
        [B, 1, Lq, L]. query: [B, Lq, D], the only rows to compute (keys and values still come from
        all of x); default x itself."""
        B, L, D = x.shape
        if query is None:
            # 3 x [B, L, D]
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:  # in_proj_weight stacks the q, k and v projections: [3D, D]
            q = F.linear(query, self.in_proj_weight[:D], self.in_proj_bias[:D])  # [B, Lq, D]
            # 2 x [B, L, D]
            k, v = F.linear(x, self.in_proj_weight[D:], self.in_proj_bias[D:]).chunk(2, dim=-1)
        Lq = q.shape[1]
        q = q.reshape(B, Lq, self.heads, D // self.heads).transpose(1, 2)  # [B, H, Lq, D/H]
        # [B, H, L, D/H]
        k, v = (t.reshape(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (k, v))
        if query is None:
            # [B, H, L, D/H]
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        # softmax(q k^T / sqrt(d) + mask) v written out: the CPU's fused
        # kernel splits a lone query's
        else:
            # keys across threads, so its result would depend on the thread count
            # (this is that math kernel's)
            scores = q @ k.transpose(-2, -1) * (D // self.heads) ** -0.5  # [B, H, Lq, L]
            x = (scores if mask is None else scores + mask).softmax(dim=-1) @ v  # [B, H, Lq, D/H]
        x = x.transpose(1, 2).reshape(B, Lq, D)  # [B, Lq, D]
        return self.out_proj(x)


def causal_mask(n):
    """OpenAI's text mask [n, n]: 0 on and below the diagonal, -inf above
    (token i sees tokens 0..i)."""
    return torch.full((n, n), float("-inf")).triu_(1)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    attn_mask: OpenAI's argument and attribute: None (vision) or an additive [n, n] mask (a boolean
    one as nn.MultiheadAttention reads it: True = masked); the text blocks get causal_mask(77).
    The causal mask runs as SDPA's is_causal (fused kernels, and a shorter sequence needs no
    cropping); any other mask is used as given, cropped to the input length.
    """

    def __init__(self, width, heads, attn_mask=None):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)
        self.attn_mask = attn_mask

    @property
    def attn_mask(self):
        return self._attn_mask

    @attn_mask.setter
    def attn_mask(self, mask):  # checked once here, not at every forward
        # nn.MultiheadAttention's meaning: True = masked
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(mask, float("-inf"))
        self._attn_mask = mask  # an attribute, as OpenAI's: not in the state_dict
        self.causal = mask is not None and mask.dim() == 2 and torch.equal(mask.cpu().float(),
                                                                           causal_mask(len(mask)))

    def forward(self, x):
        """x: [L, B, width], OpenAI's layout (what
        `transformer.resblocks[i](x)` gets in ported code)."""
        return self.forward_nld(x.transpose(0, 1)).transpose(0, 1)

    def forward_nld(self, x, keep=None):
        """x: [B, L, width], batch-first: what encode_text and encode_image run. keep: [B]
        positions, one per sequence: only those rows are computed (the attention's keys and values
        still come from every token before them), and the output is [B, 1, width]."""
        L = x.shape[1]
        mask = None
        if self.attn_mask is not None and (keep is not None or not self.causal):  # else is_causal
            # moved once: a copy from the CPU at every forward
            if self._attn_mask.device != x.device:
                self._attn_mask = self._attn_mask.to(x.device)  # would wait on the GPU's queue
            mask = self._attn_mask[:L, :L].to(x.dtype)  # [L, L]
        h = self.ln_1(x)
        if keep is None:
            x = x + self.attn(h, causal=self.causal, mask=None if self.causal else mask)
        else:
            rows = torch.arange(len(x), device=x.device)
            if mask is not None:  # the mask's row `keep` (causal: token keep sees tokens 0..keep)
                mask = mask[keep][:, None, None, :]  # [B, 1, 1, L]: every head, the one query
            query = h[rows, keep].unsqueeze(1)  # [B, 1, width]
            x = x[rows, keep].unsqueeze(1) + self.attn(h, mask=mask, query=query)  # [B, 1, width]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask=None):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads,
                                                                attn_mask) for _ in range(layers)])
        # Activation checkpointing (open_clip's name): keep only each block's input for the backward
        # pass and recompute the rest there. Same gradients, about a third more compute, and a
        # fraction of the memory: PMPO's 1,000 classes x 4 prompts keep ~10 GiB of activations
        # without it.
        self.grad_checkpointing = False

    def forward(self, x):
        """x: [L, B, width], OpenAI's layout:
        `clip_model.transformer(x.permute(1, 0, 2))` as in CoOp."""
        return self.forward_nld(x.transpose(0, 1)).transpose(0, 1)

    def forward_nld(self, x, deep_prompts=None, prompt_start=0, keep=None):
        """x: [B, L, width]. deep_prompts: {layer index: tokens [n, width] or [B, n, width]}.
        Returns [B, L, width], or [B, 1, width] with keep.

        Before block i, the n tokens at x[:, prompt_start:prompt_start + n] are replaced by
        deep_prompts[i] ("deep" prompting as in VPT-deep, MaPLe and IVLP: every prompted layer
        gets fresh learnable tokens, and what the previous layer wrote there is discarded). Where
        the sequence ends at prompt_start (no prompt slots yet), they are appended there.

        keep: [B] the one position per sequence whose output the caller reads (encode_text: the
        end-of-text token; encode_image: CLS). The last block then computes only that row after
        its keys and values: the other rows' queries, attention output, out_proj and MLP feed
        nothing, and they are 10 of the block's 12 width^2 multiply-adds per token (about 7% of a
        12-layer encoder). The kept rows are the same computation as before (float32 rounding).
        """
        deep_prompts = deep_prompts or {}
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            if i in deep_prompts:
                x = replace_tokens(x, deep_prompts[i], prompt_start)
            rows = keep if i == last else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block.forward_nld, x, rows, use_reentrant=False)
            else:
                x = block.forward_nld(x, rows)
        return x


def replace_tokens(x, tokens, start):
    """Return x with x[:, start:start + n] set to `tokens` ([n, D] shared by
    the batch, or [B, n, D])."""
    B = x.shape[0]
    # [B, n, D]
    tokens = tokens.to(x.dtype).expand(B, -1, -1) if tokens.dim() == 2 else tokens.to(x.dtype)
    return torch.cat([x[:, :start], tokens, x[:, start + tokens.shape[1]:]], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width)
        )
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x, deep_prompts=None):
        """x: images [B, 3, H, W]. deep_prompts: {layer: tokens [n, width] or [B, n, width]}.

        Prompt tokens go after the patch tokens (MaPLe's layout, so CLS stays at index 0). The
        first prompted layer appends its tokens: layer 0 to the input before ln_pre, a later
        layer i before block i (layers before it see no prompt). Every later prompted layer
        replaces them, so all layers must give the same number of tokens. The slots carry no
        positional embedding, as in VPT.
        """
        x = self.conv1(x.to(self.conv1.weight.dtype))  # [B, width, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [B, grid ** 2, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, width]
        # [B, grid ** 2 + 1, width]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        deep_prompts = dict(deep_prompts or {})
        if len({t.shape[-2] for t in deep_prompts.values()}) > 1:
            raise ValueError("every layer's vision prompt must have the same number "
                             "of tokens (each replaces the "
                             f"last one's), got "
                             f"{({i: t.shape[-2] for i, t in sorted(deep_prompts.items())})}")
        n_tokens = x.shape[1]
        if 0 in deep_prompts:
            # [B, grid ** 2 + 1 + n_ctx, width]
            x = replace_tokens(x, deep_prompts.pop(0), n_tokens)
        x = self.ln_pre(x)
        cls_position = torch.zeros(len(x), dtype=torch.long, device=x.device)  # [B]
        x = self.transformer.forward_nld(x, deep_prompts=deep_prompts, prompt_start=n_tokens,
                                         keep=cls_position)
        return self.ln_post(x[:, 0]) @ self.proj  # CLS token -> [B, output_dim]


class CLIP(nn.Module):
    def __init__(self, embed_dim,
                 # vision
                 image_resolution, vision_layers, vision_width, vision_patch_size,
                 # text
                 context_length, vocab_size, transformer_width, transformer_heads,
                 transformer_layers):
        super().__init__()
        self.context_length, self.vocab_size = context_length, vocab_size
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width,
                                        vision_layers, heads=vision_width // 64,
                                        output_dim=embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       attn_mask=self.build_attention_mask())
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation; only matters for CLIPs trained from scratch
        (the tests' tiny ones)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for transformer in (self.transformer, self.visual.transformer):
            width, layers = transformer.width, transformer.layers
            proj_std, attn_std, fc_std = (
                (width**-0.5) * ((2 * layers) ** -0.5),
                width**-0.5,
                (2 * width) ** -0.5,
            )
            for block in transformer.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    def build_attention_mask(self):
        """The text transformer's causal mask [context_length, context_length] (OpenAI's method)."""
        return causal_mask(self.context_length)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def compute_precision(self, device_type):
        """Autocast to the matrices' dtype if cast_matrices made them bf16/fp16 and the caller
        has not entered autocast itself (a float32 CLIP: a no-op), so a cast CLIP works
        wherever a float32 one does."""
        if self.dtype == torch.float32 or torch.is_autocast_enabled(device_type):
            # (an autocast with enabled=False would turn the caller's off)
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)

    def encode_image(self, image, deep_prompts=None):
        with self.compute_precision(image.device.type):
            return self.visual(image, deep_prompts=deep_prompts)

    def encode_text(self, text, embeddings=None, deep_prompts=None, length=None):
        """text: token ids [B, 77] (from clip.tokenize). Returns features [B, embed_dim].

        embeddings: optional [B, 77, width] input embeddings to use instead of
        token_embedding(text); prompt learners pass their learnable context here (CoOp), and `text`
        still tells where the end-of-text token is. deep_prompts: {layer: tokens [n, width]}
        replacing positions 1..n (right after start-of-text) before that layer; they must end before
        every end-of-text token (a caller with a learnable context also keeps them off the class
        name: PromptLearner.encode).

        The sequence is cut after the batch's last end-of-text token. Under the causal mask no
        token before it can see the padding behind it, so the features are the same (to float32
        rounding: the attention sums run over fewer keys), and short class-name prompts (~15 tokens
        of 77) cost a fifth of the compute.

        length: every text's end-of-text token is at position length - 1, as a caller that knew it
        when it tokenized says (prompts.common.encode_by_length's buckets). Then no position is read
        back from the device: on a GPU each read-back waits for all queued work (a host sync).
        """
        eot = text.argmax(dim=-1)  # end-of-text has the highest id (49407) in every sequence
        n = length or int(eot.max()) + 1
        longest = max((t.shape[-2] for t in (deep_prompts or {}).values()), default=0)
        if longest:
            shortest = length - 1 if length else int(eot.min())  # the first end-of-text position
            if longest >= shortest:
                raise ValueError(f"a deep text prompt of {longest} tokens would overwrite the "
                                 f"end-of-text token (position {shortest} of the shortest text)")
        with self.compute_precision(text.device.type):
            # [B, n, width]
            x = self.token_embedding(text[:, :n]) if embeddings is None else embeddings[:, :n]
            x = x + self.positional_embedding[:n].to(x.dtype)
            # [B, 1, width]
            x = self.transformer.forward_nld(x, deep_prompts=deep_prompts, prompt_start=1, keep=eot)
            # the end-of-text token's features: [B, embed_dim]
            return self.ln_final(x[:, 0]) @ self.text_projection

    def forward(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        # [B_img, B_txt]
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def cast_matrices(model, dtype):
    """Keep a frozen CLIP's matrices in `dtype` (bf16 or fp16, for a GPU), as OpenAI's
    clip.load keeps fp16 weights on CUDA. Under autocast a float32 weight is cast again at
    every call (autocast caches the casts of weights that learn, not of frozen ones): a
    copy of all of CLIP per step.

    Cast: exactly the parameters autocast would cast where they are used (every linear and conv
    weight and bias, the projections, the vision class and position embeddings, which meet the
    conv's bf16 output), so under autocast the results are the same bits. Kept float32: LayerNorms,
    the token embedding and text positions (looked up and added in float32) and logit_scale. Run a
    cast CLIP under torch.autocast(dtype); encode_text and encode_image enter it themselves.
    """
    for module in model.modules():
        if isinstance(module, (LayerNorm, nn.Embedding)):
            continue
        for name, p in module.named_parameters(recurse=False):
            if module is model and name != "text_projection":  # text positions, logit_scale
                continue
            p.data = p.data.to(dtype)
    return model


# Keys of OpenAI's TorchScript archives that are not parameters.
_JIT_METADATA = ("input_resolution", "context_length", "vocab_size")


def build_model(state_dict):
    """Build a float32 CLIP whose architecture is read off the state_dict's shapes, and load it.

    Works for OpenAI's ViT-B/32, ViT-B/16, ViT-L/14(@336px) and any smaller CLIP of the same layout.
    Raises ValueError with the reason when the state_dict is not such a CLIP.
    """
    sd = {k: v for k, v in state_dict.items() if k not in _JIT_METADATA}
    if "visual.proj" not in sd:
        if any(k.startswith("visual.layer1") for k in sd):
            raise ValueError("this is a ResNet CLIP (RN50, RN101, ...); only the ViT CLIPs are "
                             "supported (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px)")
        raise ValueError("not an OpenAI-layout CLIP state_dict: the key 'visual.proj' is missing "
                         f"(first keys: {list(sd)[:5]})")
    try:
        patch_size = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        width = sd["ln_final.weight"].shape[0]
        model = CLIP(
            embed_dim=sd["text_projection"].shape[1],
            image_resolution=patch_size * grid,
            vision_layers=len(
                [k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")]
            ),
            vision_width=sd["visual.conv1.weight"].shape[0],
            vision_patch_size=patch_size,
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            transformer_width=width,
            transformer_heads=width // 64,
            transformer_layers=len(
                {k.split(".")[2] for k in sd if k.startswith("transformer.resblocks")}
            ),
        )
    except KeyError as e:
        raise ValueError(f"not an OpenAI-layout CLIP state_dict: the key {e} is missing") from None
    sd = {k: v.float() for k, v in sd.items()}  # OpenAI ships half of the tensors in fp16
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        # on one line: torch's message spans several, one per missing or misfit key
        raise ValueError(f"the state_dict does not fit the CLIP its shapes describe: "
                         f"{' '.join(str(e).split())}") from None
    return model.eval()
