"""prompt_learner.pt and train_state.pt: what they hold, how they are written, and their one
reader, which checks a checkpoint's keys, types, config and finite values, and its fit to the run
or model it is loaded into (check_fit), naming the file and what is wrong.

    prompt_learner.pt  the learned tensors, their method, config, class names and CLIP's shape
    train_state.pt     the optimizer, the random streams and the epochs done (resume only)
"""
import os

import torch

import options
import prompts
from clip.files import atomic_write
from console import write_errors
from prompts import clip_architecture
from prompts.common import learned_state


CHECKPOINT_KEYS = dict(prompt_learner=("method", "config", "classnames", "epoch", "state_dict"),
                       train_state=("done", "stage", "optimizer", "rng", "learned"))
# what train.py's save_checkpoint writes, with the type each value must have
PROMPT_CHECKPOINT = dict(method=str, config=dict, classnames=list, epoch=int,
                         clip_architecture=dict, state_dict=dict)
# the config keys train.py records as strings (and the method's own string options)
CONFIG_STRINGS = ("method", "model", "protocol", "dataset", "device", "precision")


def expected_state(model, cfg):
    """What a checkpoint of this run holds: its method, class names and learned tensors' shapes
    (prompt_learner.pt: the parameters; train_state.pt: with the buffers)."""
    def shapes(buffers):
        return {k: tuple(v.shape) for k, v in learned_state(model, buffers=buffers).items()}
    return dict(method=cfg["method"], classnames=list(model.classnames),
                prompt_learner=shapes(False), train_state=shapes(True))


def checkpoint_problem(ckpt):
    """What is wrong in a checkpoint's values (None if nothing): keys, types, the config's."""
    for key, kind in PROMPT_CHECKPOINT.items():
        if key not in ckpt:
            return f"it has no {key!r}"
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            return f"its {key!r} is a {type(ckpt[key]).__name__}, not a {kind.__name__}"
    if ckpt["epoch"] < 0:
        return f"its epoch is {ckpt['epoch']}"
    if not ckpt["classnames"] or not all(isinstance(c, str) and c for c in ckpt["classnames"]):
        return "its classnames are not a list of names"
    if not ckpt["state_dict"]:
        return "its state_dict is empty: the learned tensors are missing"
    bad = [k for k, t in ckpt["state_dict"].items() if not torch.is_tensor(t)]
    if bad:
        return f"its state_dict's {bad[0]} is a {type(ckpt['state_dict'][bad[0]]).__name__}, " \
               f"not a tensor"
    arch = ckpt["clip_architecture"]
    if not all(type(arch.get(k)) is int for k in ("embed_dim", "image_resolution", "text_width")):
        return f"its clip_architecture {arch} is not a CLIP's"
    return config_problem(ckpt["config"], ckpt["method"])


def config_problem(cfg, method):
    """What is wrong in a checkpoint's config: the method's options, each of its default's type."""
    if cfg.get("method") != method:
        return f"it holds {method} prompts, but its config says method {cfg.get('method')!r}"
    for key in (*CONFIG_STRINGS, *prompts.METHODS[method].DEFAULTS):
        if key not in cfg:
            return f"its config has no {key!r}"
    defaults = options.settings(method, "", {})  # each setting's type, as train.py resolves it
    for key, value in cfg.items():
        want = "" if key in CONFIG_STRINGS else defaults.get(key)
        if not options.same_type(value, want) or (key in CONFIG_STRINGS and value is None):
            return f"its config's {key} is {value!r}, not a {type(want).__name__}"
    return None


class Damaged(SystemExit):
    """A checkpoint that cannot be read at all (a full disk, a kill on a filesystem without
    atomic renames), as opposed to one that can but belongs elsewhere."""


def read_checkpoint(path, cfg=None, expected=None, kind="prompt_learner"):
    """prompt_learner.pt or train_state.pt (kind), checked against the run it should belong to
    (cfg, expected_state): SystemExit naming the file and what is wrong, else the dict."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Damaged(f"error: {path} is damaged: it could not be read "
                      f"({type(e).__name__})") from None
    if kind == "prompt_learner":
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or \
                ckpt.get("method") not in prompts.METHODS:
            raise SystemExit(f"error: {path} is not a prompt checkpoint written by train.py "
                             f"(a CLIP checkpoint goes to --model instead)")
        problem = checkpoint_problem(ckpt)
        if problem:
            raise SystemExit(f"error: {path} is damaged or was edited: {problem}. Use the "
                             f"prompt_learner.pt that train.py wrote (or train again)")
    missing = [k for k in CHECKPOINT_KEYS[kind] if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(f"error: {path} is not a {kind}.pt of train.py (no {', '.join(missing)})")
    tensors = ckpt["state_dict" if kind == "prompt_learner" else "learned"]
    if not isinstance(tensors, dict) or not isinstance(ckpt.get("epoch", 0), int):
        raise SystemExit(f"error: {path} is not a {kind}.pt of train.py (no tensors or epoch)")
    odd = [k for k, t in tensors.items() if torch.is_tensor(t) and (t.layout != torch.strided
                                                                    or t.is_meta)]
    if odd:  # sparse or meta: train.py writes plain dense tensors only
        raise SystemExit(f"error: {path}: {odd[0]} is a {tensors[odd[0]].layout} tensor on "
                         f"{tensors[odd[0]].device}, not a dense one as train.py writes; use the "
                         f"checkpoint train.py wrote (or train again)")
    check_finite(tensors, path)
    if kind == "prompt_learner" and cfg is not None:
        old = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
        other = [f"{k}: {a!r} (this run: {b!r})" for k, (a, b) in
                 options.differences(old, cfg).items() if k != "clip_sha256"]
        if other:
            raise SystemExit(f"error: {path} belongs to another run ({', '.join(other[:3])})")
    if expected is None:
        return ckpt
    if kind == "prompt_learner" and ckpt["method"] != expected["method"]:
        raise SystemExit(f"error: {path} holds {ckpt['method']!r} prompts, this run is "
                         f"{expected['method']!r}")
    if kind == "prompt_learner" and list(ckpt["classnames"]) != expected["classnames"]:
        raise SystemExit(f"error: {path} was trained on other classes than this run's")
    check_fit(path, tensors, expected[kind])
    return ckpt


def describe(t):
    return f"{tuple(t.shape)} {t.dtype}" if torch.is_tensor(t) else type(t).__name__


def check_fit(path, tensors, wanted):
    """The one fit check: the learned tensors of the checkpoint at `path` are exactly those the
    model wants (names and shapes, floating point)."""
    missing = [k for k in wanted if k not in tensors]
    unexpected = [k for k in tensors if k not in wanted]
    shapes = [f"{k} {describe(t)}, not {tuple(wanted[k])}" for k, t in tensors.items()
              if k in wanted and not (torch.is_tensor(t) and t.is_floating_point()
                                      and tuple(t.shape) == tuple(wanted[k]))]
    if missing or unexpected or shapes:
        raise SystemExit(f"error: {path} does not fit this run's learned tensors (missing "
                         f"{missing}, unexpected {unexpected}, shapes {shapes[:3]})")


def save_checkpoint(out, model, cfg, epochs_done):
    """Only the learned tensors (KB to a few MB), never CLIP, and what is needed to use them."""
    save_torch(os.path.join(out, "prompt_learner.pt"), dict(
        method=cfg["method"], config=options.recorded(cfg), classnames=model.classnames,
        epoch=epochs_done,
        clip_architecture=clip_architecture(model.clip), state_dict=learned_state(model)))


def save_torch(path, obj):
    with write_errors(path), atomic_write(path, "wb") as f:
        torch.save(obj, f)


def check_finite(tensors, source):
    """Stop, naming them, if loaded tensors hold NaN or infinity (chance-level results)."""
    bad = [k for k, t in tensors.items()
           if torch.is_tensor(t) and t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise SystemExit(f"error: {source}: NaN or infinite values in {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}; the file is damaged or was trained "
                         f"with a too-high lr")
