"""The work saved where it changes no result: length buckets for the text encoder
(prompts.common.encode_by_length) and class features computed once while the text side is frozen
(PromptedCLIP). Each is checked against the full computation: features and gradients equal to
float32 rounding (or exactly)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import options
import train
from clip.tokenizer import tokenize
from measure import full_length_text_features
from prompts.common import encode_by_length, layer_dict, zeroshot_classifier
from tests.synthetic import one_thread  # noqa: F401 (a fixture)
from tests.tiny import tiny_clip

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 to 12 tokens between start and end of text, in no order of length
CLASSNAMES = ["sea lion", "cat", "golden retriever", "cat",
              "chocolate cake with cream cheese frosting", "airport terminal", "x"]


@pytest.fixture(scope="module")
def clip3():
    return tiny_clip(seed=1, transformer_layers=3, vision_layers=3).requires_grad_(False)


def rel_err(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def aple(clip_model, classnames=CLASSNAMES):
    cfg = options.config("aple", "caltech101", device="cpu", depth=3)
    return train.build_method("aple", clip_model, classnames, "a photo of a {}.", cfg)


def test_buckets_equal_the_full_77_tokens_in_evaluation(clip3):
    text = tokenize([f"a photo of a {name}." for name in CLASSNAMES])
    full = full_length_text_features(clip3, text)
    with torch.no_grad():
        assert rel_err(encode_by_length(clip3, text), full) < 1e-6
        assert rel_err(encode_by_length(clip3, text, chunk=2), full) < 1e-6  # buckets split further
    expected = torch.nn.functional.normalize(full, dim=-1)
    assert rel_err(zeroshot_classifier(clip3, CLASSNAMES, "a photo of a {}."), expected) < 1e-6


def test_buckets_do_each_prompts_own_work(clip3):
    """The FLOPs of the buckets are those of each prompt run alone at its own length: the floor."""
    text = tokenize([f"a photo of a {name}." for name in CLASSNAMES])

    def flops(fn):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()
    alone = sum(flops(lambda: clip3.encode_text(t[None])) for t in text)
    assert flops(lambda: encode_by_length(clip3, text)) == alone
    # the batch cut pads all to the longest
    assert flops(lambda: clip3.encode_text(text)) > 1.4 * alone


def test_buckets_equal_the_full_77_tokens_in_training_with_deep_prompts(clip3):
    """APLe's text side in its joint stage: learnable context at the input and deep prompts
    in layers 1-2. Features and the gradients of both equal those of the full 77-token
    forward to float32 rounding."""
    model = aple(clip3)
    model.set_stage("joint")
    weights = torch.randn(len(CLASSNAMES), clip3.text_projection.shape[1],
                          generator=torch.Generator().manual_seed(0))
    learner = model.prompt_learner

    def features_and_grads(full):
        model.zero_grad(set_to_none=True)
        if full:
            deep = layer_dict(model.text_prompts, 1)
            f = full_length_text_features(clip3, learner.tokenized_prompts, learner()[0], deep)
            f = torch.nn.functional.normalize(f, dim=-1)
        else:
            f = model.text_features()  # through encode_by_length
        (f * weights).sum().backward()
        return f.detach(), learner.ctx.grad.clone(), model.text_prompts.grad.clone()

    bucketed, full = features_and_grads(False), features_and_grads(True)
    assert rel_err(bucketed[0], full[0]) < 1e-6
    for name, a, b in zip(("ctx", "text_prompts"), bucketed[1:], full[1:]):
        assert b.abs().sum() > 0, name
        assert (a - b).norm() / b.norm() < 1e-5, name


def test_buckets_carry_per_prompt_deep_prompts(clip3):
    """Deep prompts of shape [B, n, width] (one set per prompt) go into the
    bucket with their prompt."""
    text = tokenize([f"a photo of a {name}." for name in CLASSNAMES])
    g = torch.Generator().manual_seed(2)
    deep = {1: torch.randn(len(text), 2, clip3.transformer.width, generator=g),
            2: torch.randn(2, clip3.transformer.width, generator=g)}
    with torch.no_grad():
        assert rel_err(encode_by_length(clip3, text, deep_prompts=deep),
                       full_length_text_features(clip3, text, deep_prompts=deep)) < 1e-6


def count_calls(model, name):
    """Wrap model.<name> on the instance; returns the list its calls are appended to."""
    calls, original = [], getattr(model, name)
    setattr(model, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def sgd_steps(model, steps=2, clear=False):
    """`steps` SGD steps of model.loss on fixed batches; clear=True drops the cached
    class features each step."""
    g = torch.Generator().manual_seed(3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    losses = []
    for _ in range(steps):
        if clear:
            model.train()
        images, labels = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, len(CLASSNAMES),
                                                                               (4,), generator=g)
        loss = model.loss(images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_frozen_text_side_is_computed_once_per_stage(clip3):
    """APLe's vision stage learns no text parameter: its class features are computed at the
    first step and reused, with the same losses and learned prompts as recomputing them
    every step. The joint stage learns the text side again and recomputes it every step;
    evaluation always recomputes."""
    models = []
    for clear in (False, True):
        torch.manual_seed(0)
        model = aple(clip3)
        model.set_stage("language")
        model.set_stage("vision")
        calls = count_calls(model, "text_features")
        losses = sgd_steps(model, steps=3, clear=clear)
        models.append((model, losses, len(calls)))
    (cached, losses, n_calls), (fresh, fresh_losses, fresh_calls) = models
    assert (n_calls, fresh_calls) == (1, 3)
    assert losses == fresh_losses
    assert torch.equal(cached.vision_prompts, fresh.vision_prompts)
    assert not torch.equal(cached.vision_prompts, aple(clip3).vision_prompts)  # the steps did learn
    assert torch.equal(cached.cached_text_features(), fresh.text_features())

    calls = count_calls(cached, "text_features")
    # the text side learns again: its features need a gradient at every step
    cached.set_stage("joint")
    sgd_steps(cached, steps=2)
    assert len(calls) == 2 and cached.cached_text_features().requires_grad
    cached.eval()
    with torch.no_grad():
        cached(torch.zeros(1, 3, 32, 32))
        cached(torch.zeros(1, 3, 32, 32))
    assert len(calls) == 5  # + the one above, + one per evaluation forward


def test_frozen_text_cache_follows_the_stage_and_precision(clip3):
    model = aple(clip3)
    model.set_stage("vision")  # language not started: the zero-shot features, a buffer
    model.train()
    calls = count_calls(model, "text_features")
    model.cached_text_features()
    model.set_stage("language")  # now the text prompts learn: recomputed, with a gradient
    assert model.cached_text_features().requires_grad
    model.set_stage("vision")  # frozen again, but other prompts than before: recomputed once
    first = model.cached_text_features()
    assert model.cached_text_features() is first
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.cached_text_features().dtype == torch.bfloat16  # another precision: recomputed
    with torch.no_grad():
        model.cached_text_features()  # no gradients at all: nothing to learn from, nothing cached
    assert len(calls) == 5



def all_rows_text(clip_model, text, deep_prompts):
    """encode_text with every row of the last block computed, then the end-of-text row read off."""
    eot, n = text.argmax(-1), int(text.argmax(-1).max()) + 1
    x = clip_model.token_embedding(text[:, :n]) + clip_model.positional_embedding[:n]
    # [B, n, width]: no keep
    x = clip_model.transformer.forward_nld(x, deep_prompts, prompt_start=1)
    return clip_model.ln_final(x[torch.arange(len(x)), eot]) @ clip_model.text_projection


def all_rows_image(clip_model, images, deep_prompts):
    """encode_image with every row of the last block computed, then the CLS row read off."""
    v = clip_model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)  # [B, grid ** 2, width]
    x = torch.cat([v.class_embedding.expand(len(x), 1, -1), x], dim=1) + v.positional_embedding
    deep_prompts = dict(deep_prompts)
    if 0 in deep_prompts:
        # layer 0's prompts, appended
        x = torch.cat([x, deep_prompts.pop(0).expand(len(x), -1, -1)], dim=1)
    x = v.transformer.forward_nld(v.ln_pre(x), deep_prompts,
                                  prompt_start=v.positional_embedding.shape[0])
    return v.ln_post(x[:, 0]) @ v.proj


@pytest.mark.parametrize("checkpointing", [False, True])
def test_last_block_computes_only_the_rows_read(clip3, checkpointing):
    """The last block of each encoder computes only the end-of-text (text) and CLS (image) rows:
    features and the gradients of deep prompts in every layer, the last one included, equal those
    of the block run on every row, to float32 rounding; and the FLOPs drop by exactly the other
    rows' share of that block."""
    g = torch.Generator().manual_seed(0)
    text = tokenize([f"a photo of a {name}." for name in CLASSNAMES])
    images = torch.randn(3, 3, 32, 32, generator=g)
    text_prompts = torch.randn(3, 2, clip3.ln_final.weight.shape[0],
                               generator=g).mul_(0.02).requires_grad_()
    vision_prompts = torch.randn(3, 2, clip3.visual.conv1.out_channels,
                                 generator=g).mul_(0.02).requires_grad_()
    for transformer in (clip3.transformer, clip3.visual.transformer):
        transformer.grad_checkpointing = checkpointing

    def features_and_grads(keep):
        text_prompts.grad = vision_prompts.grad = None
        # text: layers 1, 2
        deep_text, deep_vision = layer_dict(text_prompts[1:], 1), layer_dict(vision_prompts, 0)
        if keep:
            features = (clip3.encode_text(text, deep_prompts=deep_text),
                        clip3.encode_image(images, deep_vision))
        else:
            features = (all_rows_text(clip3, text, deep_text),
                        all_rows_image(clip3, images, deep_vision))
        sum(f.square().sum() for f in features).backward()
        return features, (text_prompts.grad.clone(), vision_prompts.grad.clone())

    try:
        (kept, kept_grads), (every,
                             every_grads) = features_and_grads(True), features_and_grads(False)
    finally:
        for transformer in (clip3.transformer, clip3.visual.transformer):
            transformer.grad_checkpointing = False
    for a, b in zip(kept, every):
        assert rel_err(a.detach(), b.detach()) < 1e-6
    for a, b in zip(kept_grads, every_grads):
        # the last layer's prompts reach the kept row through its keys and values
        assert b[-1].abs().sum() > 0
        assert (a - b).norm() / b.norm() < 1e-5

    flops = []
    for encode in (clip3.encode_image, lambda x: all_rows_image(clip3, x, {})):
        # the plain attention kernel: its matmuls are counted (the CPU's fused
        # one is not counted at all)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(
            display=False
        ) as counter:
            encode(images)
        flops.append(counter.get_total_flops())
    # tokens, width
    T, w = clip3.visual.positional_embedding.shape[0], clip3.visual.conv1.out_channels
    # per other row: q, out_proj and the MLP (1 + 1 + 8 width^2) and its attention
    # scores and sum (2 T width)
    assert flops[1] - flops[0] == len(images) * (T - 1) * 2 * (10 * w * w + 2 * T * w)
