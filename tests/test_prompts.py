"""prompts/: what each method learns (parameter counts at ViT-B/16 sizes, gradients only into
prompts), CoOp's prompt construction, PMPO's depth partitions, APLe's Gaussian image adapter, and
what each baseline (CoCoOp, KgCoOp, IVLP, MaPLe, PromptSRC) adds to it."""
import numpy as np
import pytest
import torch

import prompts
import train
from clip.tokenizer import tokenize
from prompts import aple, pmpo, promptsrc, zeroshot
from prompts.common import PromptLearner, learned_state, zeroshot_classifier
# one_thread is a fixture
from tests.synthetic import one_thread, save_tiny_clip, write_folder  # noqa: F401
# vit_b16 is a fixture
from tests.tiny import (CLASSNAMES, TEMPLATE, stage_count, tiny_flags, tiny_method,  # noqa: F401
                        vit_b16)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny CLIP as train.py loads it: from a checkpoint file, through
    train.load_frozen_clip."""
    path = save_tiny_clip(tmp_path_factory.mktemp("tiny") / "tiny.pt")
    return train.load_frozen_clip(path, "cpu")


def requires_grad_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- trainable parameters at ViT-B/16 sizes --------------------------------------------------------

DEEP_B16 = {"prompt_learner.ctx": 4 * 512, "text_prompts": 8 * 4 * 512,
            "vision_prompts": 9 * 4 * 768}


@pytest.mark.parametrize("method, expected, parts", [
    ("coop", 2_048, {"prompt_learner.ctx": 4 * 512}),
    # the meta-net: Linear(512 -> 32), Linear(32 -> 512)
    ("cocoop", 35_360,
     {"prompt_learner.ctx": 4 * 512, "meta_net.linear1.weight": 32 * 512,
      "meta_net.linear1.bias": 32,
                        "meta_net.linear2.weight": 512 * 32, "meta_net.linear2.bias": 512}),
    ("kgcoop", 2_048, {"prompt_learner.ctx": 4 * 512}),
    # 2 + 2 tokens in all 12 layers of each encoder (its official config): 12*2*512 + 12*2*768
    ("ivlp", 30_720, {"prompt_learner.ctx": 2 * 512, "text_prompts": 11 * 2 * 512,
                      "vision_prompts": 12 * 2 * 768}),
    # 2 text tokens in 9 layers, and 9 x Linear(512 -> 768) with bias
    # coupling them to the vision side
    ("maple", 3_555_072, {"prompt_learner.ctx": 2 * 512, "text_prompts": 8 * 2 * 512,
                          **{f"proj.{i}.weight": 768 * 512 for i in range(9)},
                          **{f"proj.{i}.bias": 768 for i in range(9)}}),
    ("promptsrc", 46_080, DEEP_B16),
    # PromptSRC's count: 4 x 512 text tokens at layer 0, 8 more layers of 4
    # x 512, 9 layers of 4 x 768
    ("aple", 46_080, DEEP_B16),
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


@pytest.mark.parametrize("method, expected", [  # the tiny CLIP: width 64, embed 64, 2 + 2 layers
    ("coop", 4 * 64),
    ("cocoop", 4 * 64 + (64 * 4 + 4) + (4 * 64 + 64)),
    ("kgcoop", 4 * 64),
    ("ivlp", 2 * 64 + 1 * 2 * 64 + 2 * 2 * 64),
    ("maple", 2 * 64 + 1 * 2 * 64 + 2 * (64 * 64 + 64)),
    ("promptsrc", 4 * 64 + 1 * 4 * 64 + 2 * 4 * 64),
    ("aple", 4 * 64 + 1 * 4 * 64 + 2 * 4 * 64),
    ("pmpo", 2 * 4 * 64 + 2 * (64 * 64 + 64)),
])
def test_train_prints_trainable_parameters(tmp_path, capsys, method, expected):
    extra = tiny_flags(method, stage_count(method))  # one epoch a stage
    model = save_tiny_clip(tmp_path / "tiny.pt")
    folder = write_folder(tmp_path / "images", ["cat", "dog"], per_class=4)
    train.main(["--method", method, "--dataset", f"folder:{folder}", "--model", model, "--out",
                str(tmp_path / "run"),
                # APLe: --stage_epochs
                "--workers", "0", "--shots", "1", "--batch_size", "2", *extra])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"trainable parameters: {expected:,}") for line in lines), lines
    with open(tmp_path / "run" / "log.txt") as f:
        assert f"trainable parameters: {expected:,}" in f.read()


# -- only the prompts learn ------------------------------------------------------------------------

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
    """Every slice along the first dim (a prompt, a layer's tokens) gets a
    gradient: none is dead weight."""
    assert p.grad is not None, name
    grad = p.grad.reshape(p.shape[0], -1) if p.dim() > 1 else p.grad[None]
    assert (grad.abs().sum(-1) > 0).all(), f"{name}: some slices get no gradient"


@pytest.mark.parametrize("method", prompts.METHODS)
def test_only_prompts_get_gradients(tiny, method):
    model = tiny_method(method, tiny)
    backward(model)
    assert_clip_untouched(model)
    learned = [(n, p) for n, p in model.named_parameters() if not n.startswith("clip.")]
    assert learned
    for name, p in learned:
        assert p.requires_grad, name
        # CoCoOp: a hidden ReLU unit no image of the batch turns on
        if name.startswith("meta_net.linear1"):
            assert p.grad.abs().sum() > 0, name  # gets no gradient (ReLU, not dead weight)
        else:
            assert_nonzero_grad(name, p)


@pytest.mark.parametrize("method", prompts.METHODS)
def test_text_checkpointing_gives_the_same_gradients(tiny, method):
    """Activation checkpointing of the text encoder (train.py's --text_checkpointing)
    recomputes what it did not keep: the loss and every gradient are bit-identical, deep text
    prompts (APLe) included."""
    model = tiny_method(method, tiny)
    # the last stage: everything the method defines learns
    model.set_stage(model.stages(model.cfg)[-1][0])
    grads = []
    for checkpointing in (False, True):
        tiny.transformer.grad_checkpointing = checkpointing
        try:
            backward(model)
        finally:
            tiny.transformer.grad_checkpointing = False
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    # a method that learns text prompts: through the checkpointed encoder
    if hasattr(model, "prompt_learner"):
        assert "prompt_learner.ctx" in grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_aple_stages_train_their_branch_only(tiny):
    model = tiny_method("aple", tiny)
    everything = {"prompt_learner.ctx", "text_prompts", "vision_prompts"}
    assert {n for n, _ in model.named_parameters() if not n.startswith("clip.")} == everything
    stages = model.stages(model.cfg)
    assert [s for s, _ in stages] == ["language", "vision", "joint"]
    expected = {"language": {"prompt_learner.ctx", "text_prompts"}, "vision": {"vision_prompts"},
                "joint": everything}
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
    """depth = 9 on a 2-layer CLIP would learn (and count, and save) prompts for layers that do not
    exist; PMPO refuses n_prompts > layers the same way."""
    with pytest.raises((ValueError, SystemExit), match="depth"):
        tiny_method("aple", tiny, depth=9)


# -- CoOp's prompt ---------------------------------------------------------------------------------

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
    # same end-of-text positions
    assert torch.equal(learner.tokenized_prompts.argmax(-1), tokens.argmax(-1))


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
        torch.testing.assert_close(model(images),
                                   zeroshot.CustomCLIP(tiny, CLASSNAMES, TEMPLATE)(images),
                                   atol=1e-5, rtol=0)


# -- PMPO's depth partitions -----------------------------------------------------------------------

def test_pmpo_partitions():
    assert pmpo.partitions(12, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    for n in range(1, 13):
        parts = pmpo.partitions(12, n)
        assert len(parts) == n
        # contiguous, in order, all
        assert [layer for part in parts for layer in part] == list(range(12))
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
        prompts = model.vision_deep_prompts()
    assert sorted(prompts) == layers
    for i, part in enumerate(pmpo.partitions(12, 4)):
        with torch.no_grad():
            expected = model.proj[i](model.prompt_learner.ctx[i])  # W_i P_i
        for layer in part:
            if layer in prompts:
                assert prompts[layer].shape == (4, 768)
                assert torch.equal(prompts[layer], expected), layer


# -- APLe's Gaussian image adapter -----------------------------------------------------------------

def images(seed=0, shape=(2, 3, 32, 32)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_gaussian_adapter_alpha_one_is_identity():
    x = images()
    assert torch.equal(aple.gaussian_adapter(x, sigma=0.05, alpha=1.0), x)


def test_gaussian_adapter_keeps_constant_images():
    x = torch.tensor([0.7, -1.2, 2.5]).view(1, 3, 1, 1).expand(2, 3, 32, 48).contiguous()
    for alpha in (0.9, 0.0):
        torch.testing.assert_close(aple.gaussian_adapter(x, sigma=0.05, alpha=alpha), x, atol=1e-5,
                                   rtol=0)


def test_gaussian_adapter_commutes_with_normalisation():
    """Filtering CLIP-normalised images equals normalising filtered raw images
    (gain 1 at DC, linear)."""
    x = images(1).abs()  # "raw" pixels
    a = torch.tensor([1 / 0.27, 1 / 0.26, 1 / 0.28]).view(1, 3, 1, 1)
    b = torch.tensor([-0.48 / 0.27, -0.46 / 0.26, -0.41 / 0.28]).view(1, 3, 1, 1)
    torch.testing.assert_close(aple.gaussian_adapter(a * x + b), a * aple.gaussian_adapter(x) + b,
                               atol=1e-5, rtol=1e-5)


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
    checker = torch.from_numpy(np.indices((32, 32)).sum(0) % 2 * 2.0 - 1).float().expand(1, 3, 32,
                                                                                         32)
    torch.testing.assert_close(aple.gaussian_adapter(checker, 0.05, 0.9), 0.9 * checker, atol=1e-5,
                               rtol=0)


# -- the baselines: CoCoOp, KgCoOp, IVLP, MaPLe, PromptSRC -----------------------------------------

def test_cocoop_logits_are_per_image_and_chunking_changes_nothing(tiny):
    """Each image against class features from its own context v_m + pi(x) (CoCoOp Eq. 3-5), written
    out one image at a time; sending one image's prompts at a time or all at once gives the same
    numbers (to rounding)."""
    model = tiny_method("cocoop", tiny)
    x = images(3, (5, 3, 32, 32))
    assert model.text_prompts_per_step(4) == 4 * len(CLASSNAMES)
    with torch.no_grad():
        logits = model(x)
        f = torch.nn.functional.normalize(tiny.encode_image(x), dim=-1)
        for b in range(len(x)):
            ctx = model.prompt_learner.ctx[0] + model.meta_net(f[b])  # [M, width]
            t = model.prompt_learner.encode(tiny, ctx=ctx[None])[0]  # [n_cls, D]
            torch.testing.assert_close(logits[b], tiny.logit_scale.exp() * t @ f[b], atol=1e-5,
                                       rtol=0)
        model.cfg = {**model.cfg, "prompts_per_chunk": 1}  # one image (3 prompts) per chunk
        # batched matmuls: float32 rounding
        torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=0)
        # no shift: CoOp's prompt "a photo of a {}.", i.e. zero-shot CLIP
        model.meta_net.linear2.weight.zero_()
        model.meta_net.linear2.bias.zero_()
        torch.testing.assert_close(model(x), zeroshot.CustomCLIP(tiny, CLASSNAMES, TEMPLATE)(x),
                                   atol=1e-5, rtol=0)


def test_kgcoop_loss(tiny):
    """CE + 8 (1 - mean_c cos(w_c, w_c^clip)); at init the context is the
    template, so the penalty is ~0."""
    model = tiny_method("kgcoop", tiny)
    x, y = images(4, (4, 3, 32, 32)), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        assert model.loss(x,
                          y) == pytest.approx(torch.nn.functional.cross_entropy(model(x), y).item(),
                                              abs=1e-5)
        ctx = model.prompt_learner.ctx
        ctx.add_(0.05 * torch.randn(ctx.shape, generator=torch.Generator().manual_seed(1)))
        w = model.text_features()
        anchor = zeroshot_classifier(tiny, CLASSNAMES, TEMPLATE)
        penalty = 1 - (w * anchor).sum(-1).mean()
        assert penalty > 1e-3
        expected = torch.nn.functional.cross_entropy(model(x), y) + 8.0 * penalty
        torch.testing.assert_close(model.loss(x, y), expected, atol=1e-6, rtol=1e-6)
        assert set(model.loss_terms) == {"ce", "kg"}


@pytest.mark.parametrize("method", ["ivlp", "maple"])
def test_two_tokens_learned_of_a_kept(tiny, method):
    """IVLP and MaPLe learn "a photo" and keep "of a": at init the prompt is the
    template, word for word."""
    model = tiny_method(method, tiny)
    learner = model.prompt_learner
    assert learner.ctx.shape == (1, 2, 64)
    tokens = tokenize([TEMPLATE.format(name) for name in CLASSNAMES])
    with torch.no_grad():
        expected = tiny.token_embedding(tokens[:, :learner.tokenized_prompts.shape[1]])
        assert torch.equal(learner()[0], expected)
        assert torch.equal(learner.ctx[0], expected[0, 1:3])


def test_maple_couples_each_layer(vit_b16):
    model = prompts.METHODS["maple"].CustomCLIP(vit_b16, CLASSNAMES, TEMPLATE,
                                                dict(prompts.maple.DEFAULTS))
    with torch.no_grad():
        vision = model.vision_deep_prompts()
        assert sorted(vision) == list(range(9))
        text = [model.prompt_learner.ctx[0], *model.text_prompts]  # P_0 .. P_8
        for i in range(9):
            assert vision[i].shape == (2, 768)
            assert torch.equal(vision[i], model.proj[i](text[i])), i  # F_i(P_i)
    # F_1 .. F_8 start as copies of one Linear (MaPLe's _get_clones); F_0 is its own
    for i in range(2, 9):
        assert torch.equal(model.proj[i].weight, model.proj[1].weight)
    assert not torch.equal(model.proj[0].weight, model.proj[1].weight)
    # copies, not one shared tensor
    assert model.proj[1].weight.data_ptr() != model.proj[2].weight.data_ptr()


def test_zeroshot_classifier_template_average(tiny):
    """A template list: the raw features averaged, then normalised (PromptSRC's t~), not
    the mean of unit vectors."""
    templates = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]
    with torch.no_grad():
        raw = torch.stack(
            [tiny.encode_text(tokenize([t.format(c) for c in CLASSNAMES])) for t in templates]
        )
    expected = torch.nn.functional.normalize(raw.mean(0), dim=-1)
    torch.testing.assert_close(zeroshot_classifier(tiny, CLASSNAMES, templates), expected,
                               atol=1e-6, rtol=0)


def test_promptsrc_gpa_weights():
    w = promptsrc.gpa_weights(20, 15, 1)  # the base-to-novel config
    assert sum(w) == pytest.approx(1)
    assert [round(v, 4) for v in w[11:18]] == [0.0044, 0.0540, 0.2420, 0.3989, 0.2420, 0.0540,
                                               0.0044]
    assert max(w[:11] + w[18:]) < 2e-4  # epochs 11 and 19: 1.3e-4
    assert promptsrc.gpa_weights(3, 1000, 1) == pytest.approx([0, 0, 1])  # far tails: no 0 / 0
    with pytest.raises(ValueError, match="gpa_std"):
        promptsrc.gpa_weights(3, 2, 0)


def test_promptsrc_gpa_averages_the_epochs(tiny):
    """After the last epoch the learned tensors are sum_e w_e theta_e; nothing else changes."""
    model = tiny_method("promptsrc", tiny, gpa_mean=2.0, gpa_std=1.5)
    params = model.learned()
    g = torch.Generator().manual_seed(0)
    expected = [torch.zeros_like(p) for p in params]
    w = promptsrc.gpa_weights(4, 2.0, 1.5)
    with torch.no_grad():
        for epoch in range(4):
            for p, e in zip(params, expected):
                p.copy_(torch.randn(p.shape, generator=g))  # "training" moved the prompts
                e += w[epoch] * p
            model.on_epoch_end(epoch, 4)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=0)
    assert {n for n, _ in model.named_parameters() if not n.startswith("clip.")} == \
        {"prompt_learner.ctx", "text_prompts", "vision_prompts"}


def test_promptsrc_loss(tiny):
    """CE + KL(p~ || p) / (B C) + 25 mean|t - t~| + 10 mean|f - f~|, t~ over PromptSRC's 60
    templates."""
    model = tiny_method("promptsrc", tiny)
    assert len(promptsrc.TEMPLATES) == len(set(promptsrc.TEMPLATES)) == 60
    x, y = images(5, (4, 3, 32, 32)), torch.tensor([0, 1, 2, 1])
    F = torch.nn.functional
    with torch.no_grad():
        loss = model.loss(x, y)
        t, f = model.text_features(), model.image_features(x)
        t0 = zeroshot_classifier(tiny, CLASSNAMES, promptsrc.TEMPLATES)
        f0 = F.normalize(tiny.encode_image(x), dim=-1)
        scale = tiny.logit_scale.exp()
        z, z0 = scale * f @ t.t(), scale * f0 @ t0.t()
        p, p0 = z.softmax(-1), z0.softmax(-1)
        kl = (p0 * (p0.log() - p.log())).sum() / z.numel()
        expected = F.cross_entropy(z,
                                   y) + kl + 25 * (t - t0).abs().mean() + 10 * (f - f0).abs().mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert set(model.loss_terms) == {"ce", "kl", "text_l1", "image_l1"}
    assert sum(model.loss_terms.values()) == pytest.approx(loss.item(), abs=1e-5)
