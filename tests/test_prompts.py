"""prompts/: what each method learns (parameter counts at ViT-B/16 sizes, gradients only into prompts),
CoOp's prompt construction, PMPO's depth partitions and APLe's Gaussian image adapter."""
import numpy as np
import pytest
import torch

import prompts
import train
from clip.model import CLIP
from clip.tokenizer import tokenize
from prompts import aple, pmpo, zeroshot
from prompts.common import PromptLearner, learned_state, zeroshot_classifier
from tests.synthetic import one_thread, save_tiny_clip, write_folder  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSNAMES = ["cat", "sea lion", "golden retriever"]  # 1, 2 and 2 BPE tokens
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def vit_b16():
    """A randomly initialised, frozen CLIP with ViT-B/16's sizes (the counts depend only on shapes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)
    return model.requires_grad_(False).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny CLIP as train.py loads it: from a checkpoint file, through train.load_frozen_clip."""
    path = save_tiny_clip(tmp_path_factory.mktemp("tiny") / "tiny.pt")
    return train.load_frozen_clip(path, "cpu")


def requires_grad_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- trainable parameters at ViT-B/16 sizes -----------------------------------------------------------

@pytest.mark.parametrize("method, expected, parts", [
    ("coop", 2_048, {"prompt_learner.ctx": 4 * 512}),
    # PromptSRC's count: 4 x 512 text tokens at layer 0, 8 more layers of 4 x 512, 9 layers of 4 x 768
    ("aple", 46_080, {"prompt_learner.ctx": 4 * 512, "text_prompts": 8 * 4 * 512, "vision_prompts": 9 * 4 * 768}),
    # 4 prompts x 4 tokens x 512, plus 4 x Linear(512 -> 768) with bias
    ("pmpo", 1_584_128, {"prompt_learner.ctx": 4 * 4 * 512,
                         **{f"proj.{i}.weight": 768 * 512 for i in range(4)},
                         **{f"proj.{i}.bias": 768 for i in range(4)}}),
])
def test_trainable_parameters_vit_b16(vit_b16, method, expected, parts):
    cfg = dict(prompts.METHODS[method].DEFAULTS)
    model = prompts.METHODS[method].CustomCLIP(vit_b16, CLASSNAMES, TEMPLATE, cfg)
    assert requires_grad_count(model) == expected
    state = learned_state(model)  # what a checkpoint holds
    assert {k: v.numel() for k, v in state.items()} == parts
    assert sum(parts.values()) == expected


@pytest.mark.parametrize("method, extra, expected", [
    ("coop", ["--epochs", "1"], 4 * 64),
    ("aple", ["--depth", "2", "--stage_epochs", "1", "1", "1"], 4 * 64 + 1 * 4 * 64 + 2 * 4 * 64),
    ("pmpo", ["--epochs", "1", "--n_prompts", "2", "--depth", "2"], 2 * 4 * 64 + 2 * (64 * 64 + 64)),
])
def test_train_prints_trainable_parameters(tmp_path, capsys, method, extra, expected):
    model = save_tiny_clip(tmp_path / "tiny.pt")
    folder = write_folder(tmp_path / "images", ["cat", "dog"], per_class=4)
    train.main(["--method", method, "--dataset", f"folder:{folder}", "--model", model, "--out", str(tmp_path / "run"),
                "--workers", "0", "--shots", "1", "--batch_size", "2", *extra])  # APLe: --stage_epochs
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"trainable parameters: {expected:,}") for line in lines), lines
    with open(tmp_path / "run" / "log.txt") as f:
        assert f"trainable parameters: {expected:,}" in f.read()


# -- only the prompts learn -----------------------------------------------------------------------------

TINY_CFG = {"coop": {}, "aple": dict(depth=2), "pmpo": dict(n_prompts=2, depth=2)}  # the tiny CLIP has 2 + 2 layers


def tiny_method(method, clip_model, **overrides):
    cfg = {**train.DEFAULTS, **prompts.METHODS[method].DEFAULTS, **TINY_CFG[method], **overrides, "method": method}
    return train.build_method(method, clip_model, CLASSNAMES, TEMPLATE, cfg)


def backward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 1, 2, 1])
    model.train()
    model.zero_grad(set_to_none=True)
    model.loss(images, labels).backward()


def assert_clip_untouched(model):
    for name, p in model.named_parameters():
        if name.startswith("clip."):
            assert not p.requires_grad, name
            assert p.grad is None, name


def assert_nonzero_grad(name, p):
    """Every slice along the first dim (a prompt, a layer's tokens) gets a gradient: none is dead weight."""
    assert p.grad is not None, name
    grad = p.grad.reshape(p.shape[0], -1) if p.dim() > 1 else p.grad[None]
    assert (grad.abs().sum(-1) > 0).all(), f"{name}: some slices get no gradient"


@pytest.mark.parametrize("method", ["coop", "pmpo"])
def test_only_prompts_get_gradients(tiny, method):
    model = tiny_method(method, tiny)
    backward(model)
    assert_clip_untouched(model)
    learned = [(n, p) for n, p in model.named_parameters() if not n.startswith("clip.")]
    assert learned
    for name, p in learned:
        assert p.requires_grad, name
        assert_nonzero_grad(name, p)


@pytest.mark.parametrize("method", ["coop", "aple", "pmpo"])
def test_text_checkpointing_gives_the_same_gradients(tiny, method):
    """Activation checkpointing of the text encoder (train.py's --text_checkpointing) recomputes what it
    did not keep: the loss and every gradient are bit-identical, deep text prompts (APLe) included."""
    model = tiny_method(method, tiny)
    if method == "aple":
        model.set_stage("joint")
    grads = []
    for checkpointing in (False, True):
        tiny.transformer.grad_checkpointing = checkpointing
        try:
            backward(model)
        finally:
            tiny.transformer.grad_checkpointing = False
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "prompt_learner.ctx" in grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_aple_stages_train_their_branch_only(tiny):
    model = tiny_method("aple", tiny)
    everything = {"prompt_learner.ctx", "text_prompts", "vision_prompts"}
    assert {n for n, _ in model.named_parameters() if not n.startswith("clip.")} == everything
    stages = model.stages(model.cfg)
    assert [s for s, _ in stages] == ["language", "vision", "joint"]
    expected = {"language": {"prompt_learner.ctx", "text_prompts"}, "vision": {"vision_prompts"}, "joint": everything}
    for stage, _ in stages:  # in order, as train.py runs them
        model.set_stage(stage)
        backward(model, seed=len(stage))
        assert_clip_untouched(model)
        params = dict(model.named_parameters())
        assert {n for n, p in params.items() if p.requires_grad} == expected[stage], stage
        assert {n for n, p in params.items() if p.grad is not None} == expected[stage], stage
        for name in expected[stage]:
            assert_nonzero_grad(name, params[name])


def test_aple_depth_beyond_the_encoders_is_refused(tiny):
    """depth = 9 on a 2-layer CLIP would learn (and count, and save) prompts for layers that do not exist;
    PMPO refuses n_prompts > layers the same way."""
    with pytest.raises((ValueError, SystemExit), match="depth"):
        tiny_method("aple", tiny, depth=9)


# -- CoOp's prompt ------------------------------------------------------------------------------------

def test_prompt_learner_init_is_the_hand_written_prompt(tiny):
    learner = PromptLearner(tiny, CLASSNAMES, n_ctx=4, ctx_init="a photo of a")
    assert learner.n_ctx == 4
    embeddings = learner().detach()  # [1, n_cls, L, width]
    tokens = tokenize([TEMPLATE.format(name) for name in CLASSNAMES])
    length = int(tokens.argmax(-1).max()) + 1  # up to the last end-of-text token
    assert embeddings.shape == (1, len(CLASSNAMES), length, 64)
    with torch.no_grad():
        expected = tiny.token_embedding(tokens[:, :length])
    assert torch.equal(embeddings[0], expected)
    assert torch.equal(learner.tokenized_prompts.argmax(-1), tokens.argmax(-1))  # same end-of-text positions


def test_prompt_learner_random_init(tiny):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        learner = PromptLearner(tiny, CLASSNAMES, n_ctx=8, ctx_init="", n_prompts=3)
    assert learner.ctx.shape == (3, 8, 64)
    assert 0.01 < learner.ctx.std().item() < 0.03  # N(0, 0.02)
    tokens = tokenize([f"{' '.join(['X'] * 8)} {name}." for name in CLASSNAMES])
    with torch.no_grad():
        expected = tiny.token_embedding(tokens[:, :learner.tokenized_prompts.shape[1]])
    emb = learner().detach()
    for i in range(3):  # each prompt: SOS, its own context, then the class name's tokens
        assert torch.equal(emb[i, :, 0], expected[:, 0])
        assert torch.equal(emb[i, :, 1:9], learner.ctx[i].detach().expand(3, -1, -1))
        assert torch.equal(emb[i, :, 9:], expected[:, 9:])


def test_coop_at_init_equals_zeroshot(tiny):
    model = tiny_method("coop", tiny)
    with torch.no_grad():
        learned = model.text_features()
    expected = zeroshot_classifier(tiny, CLASSNAMES, "a photo of a {}.")
    torch.testing.assert_close(learned, expected, atol=1e-6, rtol=0)
    with torch.no_grad():  # and so are the logits of zero-shot CLIP
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model(images), zeroshot.CustomCLIP(tiny, CLASSNAMES, TEMPLATE)(images),
                                   atol=1e-5, rtol=0)


# -- PMPO's depth partitions -------------------------------------------------------------------------

def test_pmpo_partitions():
    assert pmpo.partitions(12, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    for n in range(1, 13):
        parts = pmpo.partitions(12, n)
        assert len(parts) == n
        assert [layer for part in parts for layer in part] == list(range(12))  # contiguous, in order, all
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # near-equal
    assert [len(p) for p in pmpo.partitions(12, 5)] == [3, 3, 2, 2, 2]
    for bad in (0, 13):
        with pytest.raises(ValueError):
            pmpo.partitions(12, bad)


@pytest.mark.parametrize("inject, layers", [("every", list(range(12))), ("first", [0, 3, 6, 9])])
def test_pmpo_vision_prompts(vit_b16, inject, layers):
    cfg = {**pmpo.DEFAULTS, "inject": inject, "depth": 12}
    model = pmpo.CustomCLIP(vit_b16, CLASSNAMES, TEMPLATE, cfg)
    with torch.no_grad():
        prompts = model.vision_prompts()
    assert sorted(prompts) == layers
    for i, part in enumerate(pmpo.partitions(12, 4)):
        with torch.no_grad():
            expected = model.proj[i](model.prompt_learner.ctx[i])  # W_i P_i
        for layer in part:
            if layer in prompts:
                assert prompts[layer].shape == (4, 768)
                assert torch.equal(prompts[layer], expected), layer


# -- APLe's Gaussian image adapter ---------------------------------------------------------------------

def images(seed=0, shape=(2, 3, 32, 32)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_gaussian_adapter_alpha_one_is_identity():
    x = images()
    assert torch.equal(aple.gaussian_adapter(x, sigma=0.05, alpha=1.0), x)


def test_gaussian_adapter_keeps_constant_images():
    x = torch.tensor([0.7, -1.2, 2.5]).view(1, 3, 1, 1).expand(2, 3, 32, 48).contiguous()
    for alpha in (0.9, 0.0):
        torch.testing.assert_close(aple.gaussian_adapter(x, sigma=0.05, alpha=alpha), x, atol=1e-5, rtol=0)


def test_gaussian_adapter_commutes_with_normalisation():
    """Filtering CLIP-normalised images equals normalising filtered raw images (gain 1 at DC, linear)."""
    x = images(1).abs()  # "raw" pixels
    a = torch.tensor([1 / 0.27, 1 / 0.26, 1 / 0.28]).view(1, 3, 1, 1)
    b = torch.tensor([-0.48 / 0.27, -0.46 / 0.26, -0.41 / 0.28]).view(1, 3, 1, 1)
    torch.testing.assert_close(aple.gaussian_adapter(a * x + b), a * aple.gaussian_adapter(x) + b, atol=1e-5, rtol=1e-5)


def test_gaussian_adapter_is_a_low_pass():
    x = images(2)
    y = aple.gaussian_adapter(x, sigma=0.05, alpha=0.9)
    X, Y = torch.fft.fft2(x), torch.fft.fft2(y)
    f = torch.fft.fftfreq(32)
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt()
    high, low = radius > 0.25, radius < 0.02
    ratio_high = (Y.abs() ** 2)[..., high].sum() / (X.abs() ** 2)[..., high].sum()
    ratio_low = (Y.abs() ** 2)[..., low].sum() / (X.abs() ** 2)[..., low].sum()
    assert ratio_high < 0.85  # (alpha + (1 - alpha) * ~0) ** 2 = 0.81
    assert ratio_low > 0.99  # DC passes
    assert (Y.abs() <= X.abs() + 1e-4).all()  # never amplifies a frequency
    # a checkerboard (the highest frequency) keeps only the alpha * I part
    checker = torch.from_numpy(np.indices((32, 32)).sum(0) % 2 * 2.0 - 1).float().expand(1, 3, 32, 32)
    torch.testing.assert_close(aple.gaussian_adapter(checker, 0.05, 0.9), 0.9 * checker, atol=1e-5, rtol=0)
