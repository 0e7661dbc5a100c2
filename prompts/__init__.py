"""The method registry: every prompt learner train.py, eval.py, bench.py and the tests know about.

A method is one module in prompts/ that defines
    DEFAULTS     its hyper-parameters (each becomes a train.py flag: --n_ctx 8, --lr 0.001, ...)
    HELP         one line of help per key of DEFAULTS, shown by `train.py --method NAME --help`
                 (options several methods share, lr, n_ctx, depth..., have theirs in
                 prompts.common.OPTION_HELP; a method's HELP may word one its own way)
    CHOICES      the allowed values where a type allows more: a tuple of strings
                 (fusion=("feature", "logit")) or a prompts.common.Range (n_prompts=Range(1),
                 alpha=Range(0, 1)), on top of prompts.common.OPTION_CHOICES (lr > 0, batch_size,
                 n_ctx, depth >= 1, ...). A number not listed must be >= 0; a True/False default
                 takes yes/no. train.py refuses anything else before it creates a run folder.
    CustomCLIP   CustomCLIP(clip_model, classnames, template, cfg), a prompts.common.PromptedCLIP
and, where it needs them,
    TOY          its settings on the built-in toy world (toy_defaults below)
    protocol_defaults(protocol, dataset, shots)  what its family's configs change per protocol
and one line in METHODS below. That is the whole fork: nothing else in the repository names a
method. For example (prompts/coop.py):
    DEFAULTS = dict(n_ctx=4, ctx_init="a photo of a", lr=0.002, batch_size=32, epochs=200)
    HELP = dict(n_ctx="context tokens M", ctx_init="words the context starts from")
    CHOICES = {}  # all of its options are in OPTION_CHOICES
Each method file's header marks its choices: [paper] stated by the paper or by its
authors' public code and configs (named by path, quoted in docs/methods/<method>.md),
[ours] our choice, with the reason.
"""

import importlib

# name -> module prompts/<name>.py; the order is the order of tables and
# --help. A new method: one line.
METHODS = {name: importlib.import_module(f"prompts.{name}") for name in [
    "coop",
    "cocoop",
    "kgcoop",
    "ivlp",
    "maple",
    "promptsrc",
    "aple",
    "pmpo",
]}


def toy_defaults(method):
    """What differs from the method's DEFAULTS on the built-in toy world (`--dataset toy`), where
    every method must run in well under a minute on a laptop CPU: its module's TOY. The toy CLIP has
    4 + 4 layers (ViT-B/16: 12 + 12), so depths scale by a third; its few-shot set is 12 classes x
    16 shots, so a batch of 16 gives 12 steps an epoch. [ours] Half the method's lr over 20 epochs
    (CoCoOp: its own lr, 10 epochs, batch 4), so that the seeds agree: what was measured to
    choose it is in docs/toy.md."""
    return dict(getattr(METHODS[method], "TOY", {}))


def protocol_defaults(method, protocol, dataset, shots):
    """What a method's own scripts, or its family's configs, change for this protocol, data set and
    K: on top of its DEFAULTS (base-to-novel) and under any flag given (options.settings). Its
    module's protocol_defaults(protocol, dataset, shots), if it has one. Sources:
    docs/methods/<method>.md."""
    own = getattr(METHODS[method], "protocol_defaults", None)
    return own(protocol, dataset, shots) if own else {}


def build(method, clip_model, classnames, template, cfg):
    """The method's CustomCLIP on these classes, on the CLIP's device. Raises ValueError for
    settings that do not fit this CLIP (e.g. more PMPO prompts than vision layers)."""
    model = METHODS[method].CustomCLIP(clip_model, classnames, template, cfg)
    model.classnames = list(classnames)
    return model.to(clip_model.token_embedding.weight.device)


def clip_architecture(clip_model):
    """What learned prompts depend on: a checkpoint records it, and refuses a
    CLIP where it differs."""
    v = clip_model.visual
    return dict(embed_dim=clip_model.text_projection.shape[1], image_resolution=v.input_resolution,
                vision_width=v.conv1.out_channels, vision_layers=v.transformer.layers,
                patch_size=v.conv1.kernel_size[0], text_width=clip_model.transformer.width,
                text_layers=clip_model.transformer.layers)
