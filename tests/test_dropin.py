"""Code written against openai/CLIP's modules and names runs here unchanged and gets our numbers.

The text encoders below are written from CoOp's and MaPLe's documented behaviour (their papers and
the TextEncoder pattern their READMEs describe), not copied: they touch only OpenAI's interfaces
(`transformer` on [L, B, width], `ln_final`, `text_projection`, `resblocks`, `visual.conv1`, ...)
and must equal encode_text / encode_image with embeddings= and deep_prompts=.
"""
import hashlib
import inspect
import io
import warnings

import pytest
import torch
from PIL import Image
from torch import nn

import clip
# CoOp's import: the module with _MODELS, _download, build_model
from clip import clip as openai_clip
from clip.model import causal_mask
from clip.simple_tokenizer import SimpleTokenizer
from tests.synthetic import Server, load_open_clip_file
from tests.tiny import tiny_clip

N_CTX = 4


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model():
    return tiny_clip(seed=5)


@pytest.fixture(scope="module")
def prompts(model):
    """CoOp's prompt: "X X X X {name}." tokenised, with the 4 context embeddings
    replaced by random ones."""
    text = clip.tokenize([f"{' '.join(['X'] * N_CTX)} {name}." for name in ["cat",
                                                                            "golden retriever",
                                                                            "tree frog"]])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeddings = model.token_embedding(text)  # [n_cls, 77, width]
        embeddings[:, 1:1 + N_CTX] = 0.02 * torch.randn(N_CTX, embeddings.shape[-1], generator=g)
    return text, embeddings


class CoOpTextEncoder(nn.Module):
    """CoOp's TextEncoder: prompt embeddings through CLIP's text transformer in
    OpenAI's [L, B, width] layout."""

    def __init__(self, clip_model):
        super().__init__()
        self.transformer, self.ln_final = clip_model.transformer, clip_model.ln_final
        self.positional_embedding, self.text_projection = (
            clip_model.positional_embedding,
            clip_model.text_projection,
        )
        self.dtype = clip_model.dtype

    def forward(self, prompts, tokenized_prompts):
        x = prompts + self.positional_embedding.type(self.dtype)
        x = self.transformer(x.permute(1, 0, 2))  # NLD -> LND, and back below
        x = self.ln_final(x.permute(1, 0, 2)).type(self.dtype)
        return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection


def maple_text(model, prompts, text, deep):
    """MaPLe's text side: before block i >= 1, tokens 1..n (after SOT) become
    deep[i]; LND throughout."""
    x = (prompts + model.positional_embedding).permute(1, 0, 2)  # [77, B, width]
    for i, block in enumerate(model.transformer.resblocks):
        if i in deep:
            ctx = deep[i].unsqueeze(1).expand(-1, x.shape[1], -1)  # [n, B, width]
            x = torch.cat([x[:1], ctx, x[1 + len(ctx):]], dim=0)
        x = block(x)
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0]), text.argmax(-1)] @ model.text_projection


def maple_image(model, images, deep):
    """MaPLe's vision side: prompt tokens appended after the patches before ln_pre (deep[0]),
    the last n tokens replaced by deep[i] before block i >= 1; CLS through ln_post and proj."""
    v = model.visual
    x = v.conv1(images).flatten(2).permute(0, 2, 1)  # [B, grid ** 2, width]
    cls = v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + v.positional_embedding
    x = torch.cat([x, deep[0].expand(x.shape[0], -1, -1)], dim=1)
    x = v.ln_pre(x).permute(1, 0, 2)  # NLD -> LND
    for i, block in enumerate(v.transformer.resblocks):
        if i in deep and i > 0:
            x = torch.cat([x[:-len(deep[i])], deep[i].unsqueeze(1).expand(-1, x.shape[1], -1)],
                          dim=0)
        x = block(x)
    return v.ln_post(x.permute(1, 0, 2)[:, 0]) @ v.proj


@torch.no_grad()
def test_coop_text_encoder_equals_encode_text(model, prompts):
    text, embeddings = prompts
    ours = model.encode_text(text, embeddings=embeddings)
    assert rel_err(CoOpTextEncoder(model)(embeddings, text), ours) < 1e-5
    # the same with the plain token embeddings: OpenAI's encode_text written out
    assert rel_err(CoOpTextEncoder(model)(model.token_embedding(text), text),
                   model.encode_text(text)) < 1e-5


@torch.no_grad()
def test_maple_text_and_image_equal_the_deep_prompts_hook(model, prompts):
    text, embeddings = prompts
    g = torch.Generator().manual_seed(1)
    deep_text = {1: 0.1 * torch.randn(N_CTX, 64, generator=g)}  # tiny CLIP: 2 layers, width 64
    assert rel_err(maple_text(model, embeddings, text, deep_text),
                   model.encode_text(text, embeddings=embeddings, deep_prompts=deep_text)) < 1e-5
    deep_image = {i: 0.1 * torch.randn(3, 64, generator=g) for i in (0, 1)}
    images = torch.randn(2, 3, 32, 32, generator=g)
    assert rel_err(maple_image(model, images, deep_image),
                   model.encode_image(images, deep_prompts=deep_image)) < 1e-5


@torch.no_grad()
def test_a_batch_first_call_is_not_what_is_computed(model, prompts):
    """The test above can fail: skipping the permutes (the bug this file guards
    against) changes the features."""
    text, embeddings = prompts
    # [B, 77, width] read as [L, B, width]
    x = model.transformer(embeddings + model.positional_embedding)
    wrong = model.ln_final(x)[torch.arange(len(text)), text.argmax(-1)] @ model.text_projection
    assert rel_err(wrong, model.encode_text(text, embeddings=embeddings)) > 0.1


def test_openai_module_attributes(model):
    mask = model.build_attention_mask()
    assert mask.shape == (77, 77) and torch.equal(mask, torch.full((77, 77), float("-inf")).triu(1))
    assert all(torch.equal(block.attn_mask, mask) for block in model.transformer.resblocks)
    assert all(block.attn_mask is None for block in model.visual.transformer.resblocks)
    assert model.dtype == torch.float32 and model.vocab_size == 49408 and model.context_length == 77
    assert model.visual.input_resolution == 32 and model.visual.proj.shape == (64, 64)


class OpenAIBlock(nn.Module):
    """openai/CLIP's ResidualAttentionBlock: nn.MultiheadAttention on [L, B,
    width] with an attn_mask."""

    def __init__(self, ours, attn_mask):
        super().__init__()
        width = ours.ln_1.normalized_shape[0]
        self.attn = nn.MultiheadAttention(width, ours.attn.heads)
        self.ln_1, self.mlp, self.ln_2, self.attn_mask = ours.ln_1, ours.mlp, ours.ln_2, attn_mask
        self.attn.load_state_dict(ours.attn.state_dict())  # same parameter names

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


@torch.no_grad()
@pytest.mark.parametrize("kind", ["causal", "none", "banded", "bool banded"])
def test_a_block_equals_openais_block_under_any_mask(kind):
    block = tiny_clip(seed=2, transformer_width=128).transformer.resblocks[0]  # 2 heads
    band = torch.ones(77, 77, dtype=torch.bool).triu(3) | torch.ones(77, 77,
                                                                     dtype=torch.bool).tril(-3)
    masks = {"causal": causal_mask(77), "none": None,
             "banded": torch.zeros(77, 77).masked_fill(band, float("-inf")),
             "bool banded": band}  # bool: True = masked, as nn.MultiheadAttention reads it
    block.attn_mask = masks[kind]
    assert block.causal == (kind == "causal")
    x = torch.randn(77, 3, 128, generator=torch.Generator().manual_seed(0))  # [L, B, width]
    assert rel_err(block(x), OpenAIBlock(block, masks[kind])(x)) < 1e-5


# --- names CoOp's load_clip_to_cpu and tokenizer code use -----------------------------------------

def test_load_has_openais_signature(tmp_path):
    params = inspect.signature(clip.load).parameters
    assert list(params) == ["name", "device", "jit", "download_root"]
    assert params["jit"].default is False and params["download_root"].default is None
    model = tiny_clip()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    # positionally, in OpenAI's order
    loaded, preprocess = clip.load(str(tmp_path / "tiny.pt"), "cpu", False, None)
    assert loaded.training is False and preprocess.n_px == 32
    with pytest.raises(RuntimeError,
                       match=r"^Model RN50 not found; available models = \['ViT-B/32'"):
        clip.load("RN50", "cpu")
    with pytest.raises(KeyError, match="Model RN50 not found"):  # indexing _MODELS as CoOp does
        openai_clip._MODELS["RN50"]


def test_models_are_urls_that_carry_their_sha256():
    for name, url in openai_clip._MODELS.items():
        assert url.startswith("https://openaipublic.azureedge.net/clip/models/") and url.endswith(
            ".pt"
        )
        assert len(url.split("/")[-2]) == 64
    assert openai_clip._MODELS["ViT-B/16"].split("/")[-2].startswith("5806e77cd80f")


@pytest.fixture
def served(monkeypatch):
    """A tiny plain state_dict served at 127.0.0.1/<sha256>/tiny-8.pt, OpenAI's URL shape."""
    model = tiny_clip(vocab_size=512)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    server = Server({f"{sha}/tiny-8.pt": data, f"{'0' * 64}/tiny-8.pt": data})
    monkeypatch.setattr(openai_clip, "RETRY_DELAY", 0)
    yield model, data, server.url + f"{sha}/tiny-8.pt", server
    server.close()


def test_coop_load_clip_to_cpu_flow(served, tmp_path, monkeypatch):
    """CoOp's load_clip_to_cpu: _download(url) into the default cache, try
    TorchScript, else a state_dict."""
    model, data, url, server = served
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(openai_clip._MODELS, "Tiny/8", url)
    # one argument, as CoOp calls it
    model_path = openai_clip._download(openai_clip._MODELS["Tiny/8"])
    assert model_path == str(tmp_path / "cache" / "tiny-8.pt") and open(model_path,
                                                                        "rb").read() == data
    try:
        with warnings.catch_warnings():  # "torch.jit.load is deprecated"
            warnings.simplefilter("ignore", DeprecationWarning)
            jit_model, state_dict = torch.jit.load(model_path, map_location="cpu").eval(), None
    except RuntimeError:
        state_dict = torch.load(model_path, map_location="cpu")
    built = openai_clip.build_model(state_dict or jit_model.state_dict())
    text = openai_clip.tokenize(["a photo of a dog."]) % 512  # tiny vocabulary
    text[0, 6] = 511  # end-of-text: the largest id
    with torch.no_grad():
        assert torch.equal(built.encode_text(text), model.encode_text(text))
    # cached
    assert (
        openai_clip._download(url, str(tmp_path / "cache")) == model_path
        and len(server.requests) == 1
    )


def test_download_checks_the_sha256_in_the_url(served, tmp_path):
    _, _, url, server = served
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        openai_clip._download(server.url + "0" * 64 + "/tiny-8.pt", str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_transform_is_the_preprocess_load_returns(tmp_path):
    torch.save(tiny_clip().state_dict(), tmp_path / "tiny.pt")
    _, preprocess = clip.load(str(tmp_path / "tiny.pt"), "cpu")
    pixels = torch.randint(0, 256, (45, 70, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.numpy())
    x = openai_clip._transform(32)(image)
    assert x.shape == (3, 32, 32) and torch.equal(x, preprocess(image))
    assert abs(x.mean().item()) < 3  # normalised, not raw [0, 255] or [0, 1] pixels


def test_simple_tokenizer_module_is_openais():
    # a copy of OpenAI's simple_tokenizer.py
    reference = load_open_clip_file("tokenizer.py").SimpleTokenizer()
    ours = SimpleTokenizer()
    for text in ["a photo of a cat.", "Kaiyangzhou's café 日本 🐶", "X X X X golden retriever."]:
        assert ours.encode(text) == reference.encode(text)
        assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text))
    assert len(ours.encode("golden retriever")) == 2  # CoOp's name_lens
    assert clip.simple_tokenizer.default_bpe().endswith("bpe_simple_vocab_16e6.txt.gz")
