"""The work saved where it changes no result: length buckets for the text encoder (prompts.common.encode_by_length)
and class features computed once while the text side is frozen (PromptedCLIP). Each is checked against the
full computation: features and gradients equal to float32 rounding (or exactly)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import prompts
import train
from bench import full_length_text_features
from clip.tokenizer import tokenize
from prompts.common import encode_by_length, layer_dict, zeroshot_classifier
from tests.synthetic import one_thread  # noqa: F401 (a fixture)
from tests.tiny import tiny_clip

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 to 12 tokens between start and end of text, in no order of length
CLASSNAMES = ["sea lion", "cat", "golden retriever", "cat", "chocolate cake with cream cheese frosting",
              "airport terminal", "x"]


@pytest.fixture(scope="module")
def clip3():
    return tiny_clip(seed=1, transformer_layers=3, vision_layers=3).requires_grad_(False)


def rel_err(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def aple(clip_model, classnames=CLASSNAMES):
    cfg = {**train.DEFAULTS, **prompts.METHODS["aple"].DEFAULTS, "depth": 3, "method": "aple"}
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
    assert flops(lambda: clip3.encode_text(text)) > 1.4 * alone  # the batch cut pads all to the longest


def test_buckets_equal_the_full_77_tokens_in_training_with_deep_prompts(clip3):
    """APLe's text side in its joint stage: learnable context at the input and deep prompts in layers 1-2.
    Features and the gradients of both equal those of the full 77-token forward to float32 rounding."""
    model = aple(clip3)
    model.set_stage("joint")
    weights = torch.randn(len(CLASSNAMES), clip3.text_projection.shape[1], generator=torch.Generator().manual_seed(0))
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
    """Deep prompts of shape [B, n, width] (one set per prompt) go into the bucket with their prompt."""
    text = tokenize([f"a photo of a {name}." for name in CLASSNAMES])
    g = torch.Generator().manual_seed(2)
    deep = {1: torch.randn(len(text), 2, clip3.transformer.width, generator=g),
            2: torch.randn(2, clip3.transformer.width, generator=g)}
    with torch.no_grad():
        assert rel_err(encode_by_length(clip3, text, deep_prompts=deep),
                       full_length_text_features(clip3, text, deep_prompts=deep)) < 1e-6
