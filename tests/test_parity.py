"""clip/ against an independent implementation: Hugging Face's CLIPModel with quick_gelu.

Every tensor of the reference is random (LayerNorm gains and biases too, so a swapped or skipped
norm shows), converted to OpenAI's layout here, loaded into clip/ with strict=True, and the image
features, text features and logits must agree to float32 rounding.
"""
import pytest
import torch

from clip.model import build_model
from measure import full_length_text_features  # the reference of the cut, shared with bench.py

transformers = pytest.importorskip("transformers", reason="pip install -r tests/requirements.txt")

SOT, EOT = 49406, 49407


def hf_clip(embed_dim, image_size, patch, v_width, v_layers, t_width, t_layers, seed=0):
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=t_width, intermediate_size=4 * t_width,
                         num_hidden_layers=t_layers, num_attention_heads=t_width // 64,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
                         bos_token_id=SOT, eos_token_id=EOT, pad_token_id=0),
        vision_config=dict(hidden_size=v_width, intermediate_size=4 * v_width,
                           num_hidden_layers=v_layers, num_attention_heads=v_width // 64,
                           image_size=image_size, patch_size=patch, hidden_act="quick_gelu"),
        projection_dim=embed_dim)
    # the plain softmax(QK^T)V path, not the fused kernel clip/ uses
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name == "logit_scale":
                p.fill_(4.0 + torch.rand(()).item())
            else:
                p.copy_(0.02 * torch.randn_like(p))
    return model


def to_openai(hf):
    """Hugging Face CLIPModel state_dict -> OpenAI's key names and layout."""
    sd = hf.state_dict()
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t(),  # Linear [out, in] -> matrix [in, out]
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t(),
        "logit_scale": sd["logit_scale"],
    }
    for hf_tower, ours, n_layers in (("text_model", "transformer",
                                      hf.config.text_config.num_hidden_layers),
                                     ("vision_model", "visual.transformer",
                                      hf.config.vision_config.num_hidden_layers)):
        for i in range(n_layers):
            h, o = f"{hf_tower}.encoder.layers.{i}.", f"{ours}.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[o + f"attn.in_proj_{kind}"] = torch.cat(
                    [sd[h + f"self_attn.{x}_proj.{kind}"] for x in "qkv"]
                )
                out[o + f"attn.out_proj.{kind}"] = sd[h + f"self_attn.out_proj.{kind}"]
                out[o + f"ln_1.{kind}"] = sd[h + f"layer_norm1.{kind}"]
                out[o + f"ln_2.{kind}"] = sd[h + f"layer_norm2.{kind}"]
                out[o + f"mlp.c_fc.{kind}"] = sd[h + f"mlp.fc1.{kind}"]
                out[o + f"mlp.c_proj.{kind}"] = sd[h + f"mlp.fc2.{kind}"]
    return out


def random_text(n, seed=0):
    """n token sequences of different lengths: SOT, random BPE ids, EOT, zero padding."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(n, 77, dtype=torch.int)
    for i in range(n):
        length = [3, 10, 75, 20, 7][i % 5]
        text[i, 0], text[i, 1 : length + 1], text[i, length + 1] = (
            SOT,
            torch.randint(1, 49000, (length,), generator=g),
            EOT,
        )
    return text


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


CONFIGS = {
    "tiny": dict(embed_dim=64, image_size=32, patch=8, v_width=64, v_layers=2, t_width=64,
                 t_layers=2),
    "ViT-B/16": dict(embed_dim=512, image_size=224, patch=16, v_width=768, v_layers=12, t_width=512,
                     t_layers=12),
}


def pooled(output):
    """transformers 5 returns a ModelOutput from get_*_features, older versions a tensor."""
    return getattr(output, "pooler_output", output)


@pytest.mark.parametrize("name", CONFIGS)
def test_features_and_logits_match_huggingface(name):
    cfg = CONFIGS[name]
    hf = hf_clip(**cfg)
    ours = build_model(to_openai(hf))  # load_state_dict(strict=True) inside
    images = torch.randn(3, 3, cfg["image_size"], cfg["image_size"],
                         generator=torch.Generator().manual_seed(1))
    text = random_text(5)
    with torch.no_grad():
        ref_img = pooled(hf.get_image_features(pixel_values=images))
        ref_txt = pooled(hf.get_text_features(input_ids=text.long()))
        ref_logits = hf(input_ids=text.long(), pixel_values=images).logits_per_image
        logits_per_image, _ = ours(images, text)
        assert rel_err(ours.encode_image(images), ref_img) < 1e-5
        assert rel_err(ours.encode_text(text), ref_txt) < 1e-5
    assert rel_err(logits_per_image, ref_logits) < 1e-5


def test_text_cut_is_exact():
    """Cutting after the batch's last EOT changes no feature beyond float32 rounding, in any row.

    Under the causal mask no kept token attends to a cut position, so the cut is exact in exact
    arithmetic. In float32 the softmax and attention sums run over n instead of 77 keys, grouped
    differently, so the last bits may move (docs/performance.md gives the figure
    bench.py measured; some shapes come out bit-identical). A cut in the wrong place or
    a leaking mask is off by far more.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    ours = build_model(to_openai(hf_clip(**CONFIGS["tiny"])))
    # longest prompt 20 tokens: the cut drops 55 of 77 positions
    text = random_text(5)[[0, 1, 3, 4]]
    for kernel in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with torch.no_grad(), sdpa_kernel(kernel):
            cut, full = ours.encode_text(text), full_length_text_features(ours, text)
        assert ((cut - full).norm(dim=-1) / full.norm(dim=-1)).max() < 1e-6, kernel


def test_parameter_counts():
    from clip.model import CLIP
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)) == 149_620_737  # ViT-B/16
    assert count(CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)) == 151_277_313  # ViT-B/32
