"""The method registry: every prompt learner train.py, eval.py, bench.py and the tests know about.

A method is one module in prompts/ that defines
    DEFAULTS     its hyper-parameters (each becomes a train.py flag: --n_ctx 8, --lr 0.001, ...)
    CustomCLIP   CustomCLIP(clip_model, classnames, template, cfg), a prompts.common.PromptedCLIP
and one line in METHODS below. That is the whole fork: nothing else in the repository names a method.
"""
from prompts import aple, coop, pmpo

METHODS = {  # name -> module; the order is the order of tables and --help
    "coop": coop,
    "aple": aple,
    "pmpo": pmpo,
}


def build(method, clip_model, classnames, template, cfg):
    """The method's CustomCLIP on these classes, on the CLIP's device. Raises ValueError for settings that
    do not fit this CLIP (e.g. more PMPO prompts than vision layers)."""
    model = METHODS[method].CustomCLIP(clip_model, classnames, template, cfg)
    model.classnames = list(classnames)
    return model.to(clip_model.token_embedding.weight.device)


def clip_architecture(clip_model):
    """What learned prompts depend on: a checkpoint records it, and refuses a CLIP where it differs."""
    v = clip_model.visual
    return dict(embed_dim=clip_model.text_projection.shape[1], image_resolution=v.input_resolution,
                vision_width=v.conv1.out_channels, vision_layers=v.transformer.layers,
                patch_size=v.conv1.kernel_size[0], text_width=clip_model.transformer.width,
                text_layers=clip_model.transformer.layers)
