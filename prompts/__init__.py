"""The method registry: every prompt learner train.py, eval.py, bench.py and the tests know about.

A method is one module in prompts/ that defines
    DEFAULTS     its hyper-parameters (each becomes a train.py flag: --n_ctx 8, --lr 0.001, ...)
    HELP         one line of help per key of DEFAULTS, shown by `train.py --method NAME --help`
                 (options several methods share, lr, n_ctx, depth..., have theirs in
                 prompts.common.OPTION_HELP; a method's HELP may word one its own way)
    CHOICES      the allowed values where a type allows more: a tuple of strings (fusion=("feature",
                 "logit")) or a prompts.common.Range (n_prompts=Range(1), alpha=Range(0, 1)), on top of
                 prompts.common.OPTION_CHOICES (lr > 0, batch_size, n_ctx, depth >= 1, ...). A number
                 not listed must be >= 0; a True/False default takes yes/no. train.py refuses anything
                 else before it creates a run folder.
    CustomCLIP   CustomCLIP(clip_model, classnames, template, cfg), a prompts.common.PromptedCLIP
and one line in METHODS below. That is the whole fork: nothing else in the repository names a method.
For example (prompts/coop.py):
    DEFAULTS = dict(n_ctx=4, ctx_init="a photo of a", lr=0.002, batch_size=32, epochs=200)
    HELP = dict(n_ctx="context tokens M", ctx_init="words the context starts from")
    CHOICES = {}  # all of its options are in OPTION_CHOICES
Each method file's header marks its choices: [paper] stated by the paper or by its authors' public code
and configs (named by path, quoted in docs/methods/<method>.md), [ours] our choice, with the reason.
"""
from prompts import aple, cocoop, coop, ivlp, kgcoop, maple, pmpo, promptsrc

METHODS = {  # name -> module; the order is the order of tables and --help
    "coop": coop,
    "cocoop": cocoop,
    "kgcoop": kgcoop,
    "ivlp": ivlp,
    "maple": maple,
    "promptsrc": promptsrc,
    "aple": aple,
    "pmpo": pmpo,
}

# The built-in toy world (`--dataset toy`, clip/toy.py), where every method must run in well under a
# minute on a laptop CPU: what differs there from each method's DEFAULTS, in this one place. The toy CLIP
# has 4 + 4 layers (ViT-B/16: 12 + 12), so depths scale by a third; its few-shot set is 12 classes x 16
# shots, so a batch of 16 gives 12 steps an epoch, and a few epochs do. Everything else is the method's own.
TOY_DEFAULTS = {
    "coop": dict(epochs=10, batch_size=16),
    "cocoop": dict(epochs=10, batch_size=16),  # its batch of 1 would be 192 steps an epoch
    "kgcoop": dict(epochs=10, batch_size=16),
    "ivlp": dict(epochs=10, batch_size=16, depth=3),
    "maple": dict(epochs=10, batch_size=16, depth=3),
    "promptsrc": dict(epochs=10, batch_size=16, depth=3, gpa_mean=7.5),  # GPA's mean at 15 of 20 -> 7.5 of 10
    "aple": dict(stage_epochs=(3, 3, 4), depth=3, batch_size=16),  # depth 9 of 12 -> 3 of 4
    "pmpo": dict(epochs=10, batch_size=16, depth=4),  # 4 prompts over all 4 vision layers: one layer each
}


def protocol_defaults(method, protocol, dataset, shots):
    """What a method's own scripts, or its family's configs, change for this protocol, data set and K: on top of
    its DEFAULTS (base-to-novel) and under any flag given (train.settings). Sources: docs/methods/<method>.md."""
    imagenet = dataset == "imagenet"
    if method == "coop":  # [paper] CoOp's configs vit_b16 (200 epochs), vit_b16_ep100, vit_b16_ep50
        if protocol == "fewshot":  # [paper] COOP.md: "CLIP + CoOp (M=16, end)", ImageNet *_ep50 "for all settings"
            return dict(n_ctx=16, ctx_init="", epochs=50 if imagenet or shots <= 1 else 100 if shots <= 4 else 200)
        return dict(epochs=50) if imagenet else {}  # [paper] base-to-novel on ImageNet: vit_b16_ep50_ctxv1
    if method == "promptsrc":  # [code] PromptSRC's configs/trainers/PromptSRC/*.yaml: GPA's Gaussian per protocol
        if protocol == "crossdataset":  # vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml
            return dict(depth=3, gpa_mean=6.0, gpa_std=10.0)
        if protocol == "fewshot":  # vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml, whose comments split the data sets
            broad = dataset in ("imagenet", "caltech101", "oxford_pets", "food101", "ucf101", "sun397")
            return dict(epochs=50, gpa_mean=30.0 if broad else 45.0, gpa_std=30.0 if broad else 5.0)
    if method == "maple" and protocol == "crossdataset":  # [code] MaPLe: vit_b16_c2_ep5_batch4_2ctx_cross_datasets
        return dict(depth=3, lr=0.0026, epochs=2)
    if protocol == "crossdataset":  # and domain generalisation: the same ImageNet-trained prompts
        if method == "aple":  # [ours] PromptSRC's cross-dataset config: depth 3/3 (20 epochs, lr 0.0025: as here)
            return dict(depth=3)
        if method == "pmpo":  # [ours] MaPLe's cross-dataset config: depth 3, lr 0.0026, 2 epochs; 3 prompts, 3 layers
            return dict(depth=3, n_prompts=3, lr=0.0026, epochs=2)
    return {}


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
