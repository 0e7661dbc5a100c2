"""The choices that move a user's numbers on real data: float32 logits, --n_ctx with
ctx_init, APLe's KL and schedule, each protocol's settings, PMPO's depth, the deep-prompt
hook, where each choice is documented, and the bounds of every integer option. Tiny CLIPs and
tiny data sets; every test here runs in well under a few seconds."""
import json
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import options
import prompts
import train
from clip.tokenizer import tokenize
from prompts import aple, pmpo, zeroshot
from prompts.common import PromptLearner, cosine_logits
# one_thread is a fixture
from tests.synthetic import one_thread, save_tiny_clip, write_folder  # noqa: F401
# vit_b16 is a fixture
from tests.tiny import CLASSNAMES, TEMPLATE, tiny_method, vit_b16  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train.load_frozen_clip(save_tiny_clip(tmp_path_factory.mktemp("tiny") / "tiny.pt"),
                                  "cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny CLIP and a `folder:` data set of four classes (two base), for
    short train.main runs."""
    tmp = tmp_path_factory.mktemp("run")
    return SimpleNamespace(tmp=tmp, model=save_tiny_clip(tmp / "tiny.pt"),
                           data=write_folder(tmp / "images", ["cat", "dog", "fish", "bird"],
                                             per_class=8))


def run(folder, name, method, *extra):
    """train.main on the folder data set; returns the run's log lines."""
    out = folder.tmp / name
    train.main(["--method", method, "--dataset", f"folder:{folder.data}", "--model", folder.model,
                "--out", str(out), "--workers", "0", "--shots", "2", "--batch_size", "2", *extra])
    return (out / "log.txt").read_text().splitlines()


def images(seed=0, n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# -- 1. logits in float32 --------------------------------------------------------------------------

def test_cosine_logits_are_float32_under_autocast():
    """At CLIP's scale (100) two classes 0.05 logit apart tie in bf16 (step 0.125 to 0.25) and
    argmax picks the lower index; in float32 they do not."""
    clip_model = SimpleNamespace(logit_scale=torch.tensor(math.log(100.0)))
    image = F.normalize(torch.randn(1, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    other = F.normalize(torch.randn(1, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    other = F.normalize(other - (other @ image.t()) * image, dim=-1)  # orthogonal to the image
    cos = torch.tensor([[0.3000], [0.3005]])  # class 1 is closer, by 0.05 logit
    text = cos * image + (1 - cos ** 2).sqrt() * other  # [2, 64], unit vectors
    expected = 100.0 * image @ text.t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = cosine_logits(clip_model, image.bfloat16(), text)
    assert logits.dtype == torch.float32
    assert logits.argmax(-1).item() == 1
    # bf16 image features: ~2e-3 relative
    torch.testing.assert_close(logits, expected, atol=0.05, rtol=0)


@pytest.mark.parametrize("method, overrides", [("coop", {}), ("aple", {}), ("pmpo", {}),
                                               ("pmpo", dict(fusion="logit")), ("zeroshot", None)])
def test_every_method_gives_float32_logits_under_autocast(tiny, method, overrides):
    """Training (loss() calls forward) and evaluation (train.evaluate calls logits()) both go
    through cosine_logits."""
    if method == "zeroshot":
        model = zeroshot.CustomCLIP(tiny, CLASSNAMES, TEMPLATE)
    else:
        model = tiny_method(method, tiny, **overrides)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(images()).dtype == torch.float32
        assert model.logits(images(), model.text_features()).dtype == torch.float32


# -- 2. --n_ctx with ctx_init ----------------------------------------------------------------------

def embed(clip_model, text):
    with torch.no_grad():
        return clip_model.token_embedding(tokenize(text))[0]  # [77, width]


def test_n_ctx_below_the_init_learns_its_first_words(tiny):
    """MaPLe's and PromptSRC's prompt learners: n_ctx = 2 of "a photo of a" learns
    "a photo", keeps "of a"."""
    learner = PromptLearner(tiny, CLASSNAMES, n_ctx=2, ctx_init="a photo of a")
    assert learner.ctx.shape == (1, 2, 64)
    assert torch.equal(learner.ctx[0].detach(), embed(tiny, "a photo")[1:3])
    emb = learner().detach()[0]  # [n_cls, L, width]: at step 0, the hand-crafted prompt
    for c, name in enumerate(CLASSNAMES):
        hand = embed(tiny, TEMPLATE.format(name))
        assert torch.equal(emb[c], hand[:emb.shape[1]]), name


def test_n_ctx_above_the_init_keeps_it_next_to_the_class_name(tiny):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        learner = PromptLearner(tiny, CLASSNAMES, n_ctx=8, ctx_init="a photo of a")
    assert learner.ctx.shape == (1, 8, 64)
    init = embed(tiny, "a photo of a")[1:5]
    assert torch.equal(learner.ctx[0, 4:].detach(), init)
    assert 0.01 < learner.ctx[0, :4].std().item() < 0.03  # N(0, 0.02)
    emb = learner().detach()[0]
    for c, name in enumerate(CLASSNAMES):  # SOS, 8 context tokens, then "{name}." and EOS
        hand = embed(tiny, f"{' '.join(['X'] * 8)} {name}.")
        assert torch.equal(emb[c, 0], hand[0])
        assert torch.equal(emb[c, 5:9], init)
        assert torch.equal(emb[c, 9:], hand[9:emb.shape[1]])
    eot = learner.tokenized_prompts.argmax(-1)
    assert eot.tolist() == [1 + 8 + len(tokenize(name)[0].nonzero()) - 2 + 1 for name in CLASSNAMES]


@pytest.mark.parametrize("method", ["coop", "aple", "pmpo"])
def test_n_ctx_is_never_dropped(tiny, method):
    for n_ctx in (2, 8):
        model = tiny_method(method, tiny, n_ctx=n_ctx)
        assert model.prompt_learner.ctx.shape[1] == n_ctx
        if method == "aple":
            assert model.text_prompts.shape[1] == n_ctx  # the deep text prompts fill the same slots
        with torch.no_grad():
            model(images(n=2))


# -- 3. APLe's KL, and each loss term in the log ---------------------------------------------------

def test_kl_forms():
    g = torch.Generator().manual_seed(0)
    logits, teacher = 5 * torch.randn(4, 10, generator=g), 5 * torch.randn(4, 10, generator=g)
    for T in (1.0, 2.0):
        p_zs, log_p = F.softmax(teacher / T, -1), F.log_softmax(logits / T, -1)
        per_image = (p_zs * (p_zs.log() - log_p)).sum(-1)  # KL(p_zs || p) of each image: [4]
        distill = aple.kl_to_teacher(logits, teacher, T, "distill")
        torch.testing.assert_close(distill, T ** 2 * per_image.mean())
        # / classes
        torch.testing.assert_close(aple.kl_to_teacher(logits, teacher, T, "promptsrc"),
                                   distill / 10)


def test_aple_records_its_loss_terms(tiny):
    model = tiny_method("aple", tiny)
    labels = torch.tensor([0, 1, 2, 1])
    model.train()
    model.set_stage("language")
    loss = model.loss(images(), labels)
    assert set(model.loss_terms) == {"ce", "kl"}
    assert not any(t.requires_grad for t in model.loss_terms.values())
    # kl_weight 1
    torch.testing.assert_close(loss.detach(), model.loss_terms["ce"] + model.loss_terms["kl"])
    with torch.no_grad():  # the KL is the distillation form against zero-shot CLIP on the raw image
        zs = cosine_logits(tiny, tiny.encode_image(images()), model.zs_text_features)
        expected = aple.kl_to_teacher(model(images()), zs, 1.0, "distill")
    torch.testing.assert_close(model.loss_terms["kl"], expected)
    model.set_stage("joint")
    model.loss(images(), labels)
    assert set(model.loss_terms) == {"ce"}


def test_aple_teacher_input(tiny):
    """teacher_input="filtered": zero-shot CLIP sees the adapter's image, as the student does."""
    model = tiny_method("aple", tiny, teacher_input="filtered")
    model.train()
    model.set_stage("language")
    model.loss(images(), torch.tensor([0, 1, 2, 1]))
    with torch.no_grad():
        zs = cosine_logits(tiny, tiny.encode_image(aple.gaussian_adapter(images())),
                           model.zs_text_features)
        expected = aple.kl_to_teacher(model(images()), zs, 1.0, "distill")
    torch.testing.assert_close(model.loss_terms["kl"], expected)


@pytest.mark.parametrize("key, value", [("kl_form", "sum"), ("teacher_input", "clean"),
                                        ("stage_schedule", "cosine"), ("kl_temperature", 0.0)])
def test_aple_bad_choices_are_refused(tiny, key, value):
    with pytest.raises(SystemExit, match=key):
        tiny_method("aple", tiny, **{key: value})


def test_the_log_shows_each_loss_term(folder):
    lines = run(folder, "terms", "aple", "--depth", "2", "--stage_epochs", "1", "1", "1")
    epochs = {
        line.split()[1]: line for line in lines if line.startswith("stage ") and " epoch " in line
    }
    assert re.search(r"loss \S+ \(ce \S+, kl \S+\)", epochs["language"]), epochs
    assert re.search(r"loss \S+ \(ce \S+, kl \S+\)", epochs["vision"]), epochs
    assert re.search(r"loss \S+ \(ce \S+\)  lr", epochs["joint"]), epochs
    lines = run(folder, "terms_coop", "coop", "--epochs", "1")
    # CE alone: the same number
    assert any(re.search(r"loss (\S+) \(ce \1\)", line) for line in lines), lines


# -- 4. one schedule over APLe's stages ------------------------------------------------------------

def logged_lrs(lines):
    return [
        float(line.split(" lr ")[1].split()[0])
        for line in lines
        if line.startswith("stage ") and " lr " in line
    ]


def test_aple_one_schedule_over_all_stages(folder):
    lr = 0.01
    lines = run(folder, "one", "aple", "--depth", "2", "--stage_epochs", "2", "2", "2", "--lr",
                str(lr))
    # Dassl's, over 6 epochs
    expected = [1e-5] + [lr * 0.5 * (1 + math.cos(math.pi * e / 6)) for e in range(5)]
    assert logged_lrs(lines) == pytest.approx(expected, rel=1e-2)
    assert not any(line.startswith("warning: stage") for line in lines)
    lines = run(folder, "restart", "aple", "--depth", "2", "--stage_epochs", "2", "2", "2", "--lr",
                str(lr), "--stage_schedule", "restart")
    assert logged_lrs(lines) == pytest.approx([1e-5, lr] * 3, rel=1e-2)


def cosine_factor(epoch, epochs, warmup=1):
    """Dassl's cosine after a recounted warm-up: (1 + cos(pi t / T)) / 2, t = epoch - warmup."""
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / epochs))


@pytest.mark.parametrize("flags, power", [((), 2), (("--schedule", "cosine"), 1)])
def test_kgcoop_squared_cosine_by_default(folder, flags, power):
    """KgCoOp's published runs: lr ((1 + cos) / 2)^2 after the warm-up epoch
    (docs/methods/kgcoop.md); --schedule cosine: the repository head's single cosine. The warm-up
    epoch stays at warmup_lr."""
    lr, epochs = 0.01, 4
    lines = run(folder, f"kgcoop_{power}", "kgcoop", "--epochs", str(epochs), "--lr", str(lr),
                *flags)
    expected = [1e-5] + [lr * cosine_factor(e, epochs) ** power for e in range(1, epochs)]
    assert logged_lrs(lines) == pytest.approx(expected, rel=1e-2)


@pytest.mark.parametrize("method", list(prompts.METHODS))
def test_lr_at_keeps_the_cosine_for_a_shape_of_one(tiny, method):
    """lr_at with a method's lr_shape (read from its model): the Dassl cosine raised to that power,
    the warm-up epochs at warmup_lr; with power 1 the same floats as the plain cosine."""
    model = tiny_method(method, tiny)
    cfg, power = model.cfg, model.lr_shape(model.cfg)
    for epochs in (1, 5, 100):
        for epoch in range(epochs + 1):
            t = epoch - cfg["warmup_epochs"]
            plain = (cfg["warmup_lr"] if t < 0 else
                     cfg["lr"] * 0.5 * (1 + math.cos(math.pi * t / epochs)))
            got = train.lr_at(epoch, epochs, cfg, power)
            if power == 1 or epoch < cfg["warmup_epochs"]:
                assert got == plain  # bit for bit
            else:
                assert got == pytest.approx(cfg["lr"] * (plain / cfg["lr"]) ** power, rel=1e-12)


@pytest.mark.parametrize("schedule, warned",
                         [("one", ["language"]), ("restart", ["language", "vision", "joint"])])
def test_a_stage_with_only_warmup_epochs_is_warned_about(schedule, warned):
    logs = []
    cfg = options.config("aple", "caltech101", device="cpu", stage_schedule=schedule)
    train.warn_warmup_only_stages([("language", 1), ("vision", 1), ("joint", 1)], cfg,
                                 schedule == "restart", logs.append)
    assert [re.search(r"stage '(\w+)'", line).group(1) for line in logs] == warned
    assert all("no epoch after the warm-up" in line for line in logs)


# -- 5. each protocol's settings; a flag given wins ------------------------------------------------

def parsed(*argv):
    return options.parse_args(["--dataset", "caltech101", *argv])


@pytest.mark.parametrize("argv, expected", [
    (["--method", "coop"], dict(epochs=200, n_ctx=4, ctx_init="a photo of a")),
    (["--method", "coop", "--dataset", "imagenet"], dict(epochs=50)),
    *[(["--method", "coop", "--protocol", "fewshot", "--shots", str(k)],
       dict(epochs=e, n_ctx=16, ctx_init=""))
      for k, e in ((1, 50), (2, 100), (4, 100), (8, 200), (16, 200))],
    (["--method", "coop", "--protocol", "fewshot", "--shots", "2", "--dataset", "imagenet"],
     dict(epochs=50)),
    (["--method", "coop", "--protocol", "crossdataset", "--dataset", "imagenet"], dict(epochs=50)),
    (["--method", "aple", "--protocol", "crossdataset", "--dataset", "imagenet"],
     dict(depth=3, lr=0.0025)),
    (["--method", "pmpo", "--protocol", "crossdataset", "--dataset", "imagenet"],
     dict(depth=3, n_prompts=3, lr=0.0026, epochs=2)),
    (["--method", "pmpo"], dict(depth=9, n_prompts=4, lr=0.0035, epochs=5)),
    # a flag given wins over the protocol's setting
    (["--method", "coop", "--dataset", "imagenet", "--epochs", "7"], dict(epochs=7)),
    (["--method", "coop", "--protocol", "fewshot", "--ctx_init", "a photo of a"],
     dict(n_ctx=16, ctx_init="a photo of a")),
    (["--method", "pmpo", "--protocol", "crossdataset", "--n_prompts", "2", "--depth", "4"],
     dict(depth=4, n_prompts=2, epochs=2)),
])
def test_protocol_settings(argv, expected):
    args = parsed(*argv)
    assert {k: args[k] for k in expected} == expected


def test_a_fewshot_file_sets_the_epochs_that_follow_from_its_shots(folder, monkeypatch):
    """CoOp's few-shot epochs follow K, and a --fewshot-file decides K: 1 shot trains 50
    epochs, not 16 shots' 200."""
    run(folder, "one_shot", "coop", "--protocol", "fewshot", "--shots", "1", "--epochs", "0")
    shots = str(folder.tmp / "one_shot" / "fewshot.json")
    # the settings are what is tested
    monkeypatch.setattr(train, "train", lambda *args, **kwargs: 0)
    for name, extra, epochs in (("file", [], 50), ("file_epochs", ["--epochs", "3"], 3)):
        run(folder, name, "coop", "--protocol", "fewshot", "--fewshot-file", shots, *extra)
        with open(folder.tmp / name / "config.json") as f:
            cfg = json.load(f)
        assert (cfg["shots"], cfg["epochs"], cfg["n_ctx"]) == (1, epochs, 16)


# -- 6. PMPO's depth -------------------------------------------------------------------------------

def test_pmpo_partitions_layers_below_its_depth(vit_b16):
    model = pmpo.CustomCLIP(vit_b16, CLASSNAMES, TEMPLATE, dict(pmpo.DEFAULTS))  # depth 9, as MaPLe
    assert model.partitions == [[0, 1, 2], [3, 4], [5, 6], [7, 8]]
    with torch.no_grad():
        # layers 9-11 carry the tokens forward
        assert sorted(model.vision_deep_prompts()) == list(range(9))


@pytest.mark.parametrize("overrides, words",
                         [(dict(depth=3), "n_prompts"), (dict(depth=13), "depth")])
def test_pmpo_depth_is_checked(vit_b16, overrides, words):
    with pytest.raises(ValueError, match=words):
        pmpo.CustomCLIP(vit_b16, CLASSNAMES, TEMPLATE, {**pmpo.DEFAULTS, **overrides})


# -- 7. the deep-prompt hook -----------------------------------------------------------------------

def test_a_vision_prompt_first_given_after_layer_0_is_appended(tiny):
    """No slots before layer 1: its tokens join the sequence there, and layer
    0 sees the plain image."""
    v = tiny.visual
    prompt = 0.1 * torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = tiny.encode_image(images(), deep_prompts={1: prompt})
        x = v.conv1(images()).flatten(2).transpose(1, 2)  # [B, 16, 64]
        x = torch.cat([v.class_embedding.expand(4, 1, -1), x], dim=1) + v.positional_embedding
        x = v.transformer.resblocks[0].forward_nld(v.ln_pre(x))  # batch-first
        x = torch.cat([x, prompt.expand(4, -1, -1)], dim=1)  # [B, 17 + 3, 64]
        x = v.transformer.resblocks[1].forward_nld(x)
        expected = v.ln_post(x[:, 0]) @ v.proj
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_vision_prompts_of_different_lengths_are_refused(tiny):
    with pytest.raises(ValueError, match="same number of tokens"):
        tiny.encode_image(images(), deep_prompts={0: torch.zeros(4, 64), 1: torch.zeros(2, 64)})


def test_a_text_deep_prompt_longer_than_the_context_is_refused(tiny):
    learner = PromptLearner(tiny, CLASSNAMES, n_ctx=2, ctx_init="a photo of a")
    learner.encode(tiny, {1: torch.zeros(2, 64)})  # fits the 2 context slots
    with pytest.raises(ValueError, match="class name"):
        # would overwrite "of": prompt text after the context
        learner.encode(tiny, {1: torch.zeros(3, 64)})
    text = tokenize(["a cat."])  # [SOS] a cat . [EOS]: end-of-text at position 4
    tiny.encode_text(text, deep_prompts={1: torch.zeros(3, 64)})  # positions 1-3
    with pytest.raises(ValueError, match="end-of-text"):
        tiny.encode_text(text, deep_prompts={1: torch.zeros(4, 64)})


# -- 8. provenance in the repository ---------------------------------------------------------------

def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


@pytest.mark.parametrize("method", list(prompts.METHODS))
def test_each_method_cites_its_page_in_the_repository(method):
    """A method file that marks a choice [paper] names the page where the marks are sourced (a
    fork's own method, with no [paper] mark, needs none)."""
    source = read(f"prompts/{method}.py")
    if "[paper]" not in source:
        pytest.skip(f"prompts/{method}.py marks no choice [paper]")
    page = f"docs/methods/{method}.md"
    assert os.path.isfile(os.path.join(ROOT, page))
    assert page in prompts.METHODS[method].__doc__
    assert "[paper]" in read(page)


# the team's design notes beside the repository, not in a clone
OUTSIDE = "/".join(("shared", "docs"))


def test_nothing_points_outside_the_repository():
    files = ["README.md", "CITATION.bib", "train.py", "eval.py",
             *(f"prompts/{f}" for f in os.listdir(os.path.join(ROOT,
                                                               "prompts")) if f.endswith(".py")),
             *(f"docs/{f}" for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))]
    for path in files:
        assert OUTSIDE not in read(path), path
    assert "line up with the tables" not in read("README.md")


@pytest.mark.parametrize("method", list(prompts.METHODS))
def test_options_page_lists_every_option(method):
    """docs/options.md, one link from the README, holds the table of choices."""
    assert "(docs/options.md)" in read("README.md")
    page = read("docs/options.md")
    for key in prompts.METHODS[method].DEFAULTS:
        if key not in ("lr", "batch_size", "epochs"):
            assert f"`--{key}" in page, key


# -- 9. every integer option has an upper bound ----------------------------------------------------

def integer_options():
    """(method, key) of every integer option train.py takes, read from the registry: each method's
    own, and the shared ones (options.DEFAULTS) once. A shared one to which options.CHOICES gives
    no upper bound is an expected failure; the mark goes once it has one."""
    first = next(iter(prompts.METHODS))
    for method, module in prompts.METHODS.items():
        shared = options.DEFAULTS if method == first else {}
        for key, default in {**shared, **module.DEFAULTS}.items():
            if type(default[0] if isinstance(default, tuple) else default) is not int:
                continue
            unbounded = (key not in module.DEFAULTS
                         and getattr(options.CHOICES.get(key), "high", math.inf) == math.inf)
            yield pytest.param(method, key, marks=[pytest.mark.xfail(
                strict=True, reason="no upper bound in options.CHOICES")] if unbounded else [])


@pytest.mark.parametrize("method, key", integer_options())
def test_an_integer_option_past_its_bound_is_refused(method, key, capsys):
    """10**20 (batch size, threads, depth, epochs...) stops at the parse with one `error:` line
    that names the option's bounds, not deep in torch."""
    default = options.settings(method, "caltech101", {})[key]
    values = [str(10**20)] * (len(default) if isinstance(default, tuple) else 1)
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--method", method, "--dataset", "caltech101", f"--{key}", *values])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert re.search(rf"^error: --{key} must be between \d+ and \d+ \(got {10**20}\)$",
                     err.strip().splitlines()[-1]), err


def test_zero_epochs_evaluate_the_initial_prompts(folder):
    lines = run(folder, "zero", "coop", "--epochs", "0")
    assert any(line.startswith("--epochs 0: nothing is trained") for line in lines), lines
