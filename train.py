"""Prompt learning for CLIP: CoOp, APLe and PMPO, in one training script.

    python train.py --method pmpo --dataset caltech101                      # base-to-novel, 16 shots, seed 1
    python train.py --method coop --dataset oxford_pets --protocol fewshot --shots 4 --seed 2
    python train.py --method aple --dataset imagenet --protocol crossdataset # then eval.py on the targets

The protocol is the CoOp family's (CoOp, CoCoOp, MaPLe, PromptSRC), so numbers compare with the
papers' tables: K shots per class drawn with the seed, SGD with one constant warm-up epoch and a
cosine schedule, the last epoch's prompts evaluated. CLIP is frozen by construction: only what a
method defines in prompts/<method>.py is learned, and only that is saved.

Everything a run used goes into its folder: config.json, fewshot.json (the exact shots),
log.txt, metrics.json and prompt_learner.pt (the learned tensors, config and class names).
"""
import argparse
import collections
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

import clip
import data
import prompts
from prompts import METHODS, clip_architecture
from prompts.common import learned_state
PROTOCOLS = ("base2novel", "fewshot", "crossdataset")

# -----------------------------------------------------------------------------
# Defaults shared by every method (the CoOp-family protocol). A method's own hyper-parameters
# (lr, batch size, epochs, prompt sizes) are DEFAULTS in prompts/<method>.py; every key of either
# can be set on the command line (--lr 0.001, --n_ctx 8, ...).
DEFAULTS = dict(
    model="ViT-B/16",        # an OpenAI name (downloaded once, sha256-checked) or a checkpoint path
    protocol="base2novel",   # train on base classes, test on base and novel (CoCoOp Sec. 4.1)
    shots=16,                # K training images per class (all protocols of the papers use 16)
    seed=1,                  # the papers average seeds 1, 2, 3
    momentum=0.9, weight_decay=5e-4,
    warmup_epochs=1, warmup_lr=1e-5,  # constant lr for the first epoch, then cosine (Dassl's)
    eval_batch_size=100, workers=min(8, os.cpu_count() or 1),
    threads=0,               # CPU threads of torch's kernels; 0: torch's default (one per core)
    # Speed and memory switches ("auto", "on" or "off"; bench.py measures them). Neither changes what
    # is learned beyond float rounding; --precision (bf16 on a GPU) is the third.
    augment_on_device="auto",   # resize the random crops on the GPU instead of with PIL (auto: on a GPU)
    text_checkpointing="auto",  # recompute text-encoder activations in backward (auto: >= 4,000 prompts a step)
)
SWITCHES = ("augment_on_device", "text_checkpointing")
# On the built-in toy world (--dataset toy) these replace the DEFAULTS above, and prompts.TOY_DEFAULTS the
# method's own. Its CLIP is tiny: its matrices are too small to share out between cores, and a 600-image
# test set is read faster in this process than by worker processes that have to start first.
TOY = dict(model="toy", threads=1, workers=0)
# -----------------------------------------------------------------------------


def parse_args(argv=None):
    """--method first decides which method's DEFAULTS become flags, then everything is parsed."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    known, _ = pre.parse_known_args(argv)
    if known.method not in METHODS:
        raise SystemExit(f"error: --method must be one of {', '.join(METHODS)} (got {known.method!r})")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(data.DATASETS)}, or folder:/path")
    p.add_argument("--root", default=os.environ.get("DATA", "data_root"), help="data sets folder ($DATA)")
    p.add_argument("--out", help="run folder (default runs/<dataset>/<method>/<protocol>/shots<K>_seed<S>)")
    p.add_argument("--fewshot-file", help="a fewshot.json to train on instead of sampling shots")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default: bf16 on GPU, fp32 on CPU")
    for key, value in {**DEFAULTS, **METHODS[known.method].DEFAULTS}.items():
        add_option(p, key, value)
    args = p.parse_args(argv)
    keys = {**DEFAULTS, **METHODS[args.method].DEFAULTS}
    given = {k: v for k, v in vars(args).items() if k in keys and v is not None}  # the flags given
    vars(args).update(settings(args.method, args.dataset, given), given=set(given))
    if args.protocol not in PROTOCOLS:
        p.error(f"--protocol must be one of {', '.join(PROTOCOLS)} (got {args.protocol!r})")
    for key in SWITCHES:
        if getattr(args, key) not in ("auto", "on", "off"):
            p.error(f"--{key} must be auto, on or off (got {getattr(args, key)!r})")
    args.precision = args.precision or default_precision(args.device)
    return args


def add_option(parser, key, default):
    """--key, typed after its default. Parsed as None when not given, so a flag given can win over the
    protocol's settings (settings() fills in the rest)."""
    kwargs = dict(default=None, help=f"default {default!r}")
    if isinstance(default, bool):
        parser.add_argument(f"--{key}", type=lambda s: s.lower() in ("1", "true", "yes", "on"), **kwargs)
    elif isinstance(default, tuple):
        parser.add_argument(f"--{key}", type=type(default[0]), nargs=len(default), **kwargs)
    else:
        parser.add_argument(f"--{key}", type=type(default), **kwargs)


def shared_defaults(dataset):
    """The DEFAULTS above, with TOY's on the toy world (eval.py's defaults too)."""
    return {**DEFAULTS, **(TOY if dataset == "toy" else {})}


def settings(method, dataset, given):
    """A run's settings, each from the first of: the flags given; what the method's family uses for this
    protocol, data set and K (prompts.protocol_defaults, e.g. CoOp's 50 epochs on ImageNet); on the
    built-in toy world, its tiny CLIP and the method's prompts.TOY_DEFAULTS; the method's DEFAULTS;
    the DEFAULTS above."""
    toy = prompts.TOY_DEFAULTS.get(method, {}) if dataset == "toy" else {}
    cfg = {**shared_defaults(dataset), **METHODS[method].DEFAULTS, **toy, **given}
    return {**cfg, **prompts.protocol_defaults(method, cfg["protocol"], dataset, cfg["shots"]), **given}


# -- setup -------------------------------------------------------------------------------------------

def safe_name(name):
    """A data set or model name as one folder name: "folder:/data/x" -> "folder__data_x", "ViT-B/16" -> "ViT-B_16"."""
    return name.replace(":", "_").replace("/", "_")


def default_precision(device):
    return "bf16" if device.startswith("cuda") else "fp32"


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def clear_errors():
    """Bad input (no data set where it should be, a damaged checkpoint, an unreadable image) ends the
    run with the message that says what to do, not with a traceback. Wraps only the calls that read input."""
    try:
        yield
    except (ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def load_frozen_clip(name, device):
    with clear_errors():
        model, _ = clip.load(name, device=device)
    return model.requires_grad_(False).eval()  # frozen by construction: nothing of CLIP gets a gradient


def build_method(method, clip_model, classnames, template, cfg):
    with clear_errors():  # settings that do not fit this CLIP (e.g. more PMPO prompts than vision layers)
        return prompts.build(method, clip_model, classnames, template, cfg)


def autocast(args):
    if args.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
    return torch.autocast(device_type=args.device.split(":")[0], dtype=dtype)


def switch_on(cfg, key, auto):
    """A switch's setting as a bool; `auto` is what "auto" means for this run."""
    return auto if cfg[key] == "auto" else cfg[key] == "on"


def lr_at(epoch, epochs, cfg):
    """Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max=epochs), WARMUP_RECOUNT=True:
    warmup_lr for the warm-up epochs, then the cosine starts over, so the first epoch after warm-up
    trains at the full lr. epoch counts from 0."""
    if epoch < cfg["warmup_epochs"]:
        return cfg["warmup_lr"]
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * (epoch - cfg["warmup_epochs"]) / epochs))


def schedule_position(stages, stage_index, epoch, cfg):
    """(epoch, epochs) of lr_at for `epoch` of stage `stage_index`. With several stages (APLe), either one
    warm-up and one cosine run over all of them ("one"), or each stage restarts its own ("restart");
    `stage_schedule` decides. With one stage the two are the same."""
    if cfg.get("stage_schedule", "one") == "restart":
        return epoch, stages[stage_index][1]
    return sum(e for _, e in stages[:stage_index]) + epoch, sum(e for _, e in stages)


def warn_warmup_only_stages(stages, cfg, log):
    """A stage whose every epoch runs at warmup_lr learns next to nothing: say so (never silently)."""
    fix = "--stage_schedule one" if cfg.get("stage_schedule") == "restart" else "fewer --warmup_epochs"
    for i, (stage, epochs) in enumerate(stages):
        last = schedule_position(stages, i, epochs - 1, cfg)[0]  # the stage's last epoch in its schedule
        if epochs and last < cfg["warmup_epochs"]:
            log(f"warning: stage {stage!r} has no epoch after the warm-up: all its {epochs} epoch(s) run at "
                f"--warmup_lr {cfg['warmup_lr']:g} and learn next to nothing. Give it more epochs, or {fix}.")


# -- the run folder: resume or refuse, never overwrite ----------------------------------------------

def prepare_run_folder(out, cfg):
    """Create `out`, or resume it if it holds an unfinished run with the same settings."""
    if os.path.exists(os.path.join(out, "metrics.json")):
        raise SystemExit(f"error: {out} already holds a finished run (metrics.json). "
                         f"Pick another --out, or delete that folder to run again.")
    config_path = os.path.join(out, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            old = json.load(f)
        changed = {k: (old.get(k), v) for k, v in cfg.items() if old.get(k) != v and k not in ("device", "workers", "threads")}
        if changed:
            raise SystemExit(f"error: {out} holds an unfinished run with other settings "
                             f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())}). "
                             f"Pick another --out, or delete that folder.")
        return torch.load(os.path.join(out, "train_state.pt"), weights_only=True) \
            if os.path.exists(os.path.join(out, "train_state.pt")) else None
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"error: {out} exists and is not a run folder of this script; pick another --out.")
    os.makedirs(out, exist_ok=True)
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return None


class Log:
    def __init__(self, path):
        self.file = open(path, "a")

    def __call__(self, msg):
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()


def save_checkpoint(out, model, cfg, epochs_done):
    """Only the learned tensors (KB to a few MB), never CLIP; plus what is needed to use them again."""
    path = os.path.join(out, "prompt_learner.pt")
    torch.save(dict(method=cfg["method"], config=cfg, classnames=model.classnames, epoch=epochs_done,
                    clip_architecture=clip_architecture(model.clip), state_dict=learned_state(model)),
               path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a broken checkpoint


# -- data --------------------------------------------------------------------------------------------

def read_dataset(name, root):
    with clear_errors():
        return data.build_dataset(name, root)


def few_shot_data(ds, args, cfg):
    """K-shot train and val lists over all classes: CoOp's draw for (split, K, seed), or --fewshot-file's."""
    if not ds.train:
        raise SystemExit(f"error: {args.dataset} is test-only; train on another data set and use eval.py on it.")
    if not args.fewshot_file:
        return data.fewshot_split(ds.train, ds.val, cfg["shots"], cfg["seed"])
    with clear_errors():
        train, val = data.load_fewshot(args.fewshot_file, ds.image_dir)
    shots = max(collections.Counter(item.label for item in train).values())  # the file decides K
    follow = prompts.protocol_defaults(cfg["method"], cfg["protocol"], args.dataset, shots)  # e.g. CoOp's epochs
    cfg.update({k: v for k, v in follow.items() if k not in args.given},
               shots=shots, fewshot_file=os.path.abspath(args.fewshot_file))
    return train, val


def warn_short_classes(train_items, shots, log):
    """CoOp keeps every image of a class smaller than K without a word; say so."""
    short = {name: n for name, n in collections.Counter(item.classname for item in train_items).items() if n < shots}
    if short:
        log(f"warning: {len(short)} classes have fewer than --shots {shots} training images and use all they "
            f"have: " + ", ".join(f"{name} ({n})" for name, n in list(short.items())[:10]))


# -- train and evaluate ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, items, args, cfg):
    """Top-1 accuracy (%) on items; the class features are computed once, then images stream by."""
    model.eval()
    device = args.device
    correct = total = 0
    with autocast(args):
        text_features = model.text_features()
        for images, labels in data.test_loader(items, model.clip.visual.input_resolution,
                                               cfg["eval_batch_size"], cfg["workers"]):
            logits = model.logits(images.to(device), text_features)
            correct += (logits.argmax(-1).cpu() == labels).sum().item()
            total += len(labels)
    return 100.0 * correct / total


def train(model, train_items, args, cfg, out, log, state=None):
    """SGD over the learned tensors, stage by stage; a checkpoint after every epoch. Returns the epochs done."""
    device = args.device
    on_device = switch_on(cfg, "augment_on_device", auto=device.startswith("cuda"))
    n_text = model.text_prompts_per_step(cfg["batch_size"])
    # Saved activations of a bf16 step, ~2.7 MB per prompt (PMPO, 500 classes x 4 prompts: 5.3 GiB, counted with
    # saved-tensor hooks). From 4,000 prompts on (PMPO on all 1,000 ImageNet classes) that outgrows a 16 GB card.
    model.clip.transformer.grad_checkpointing = switch_on(cfg, "text_checkpointing", auto=n_text >= 4000)
    log(f"precision {args.precision}; crops resized {'on ' + device if on_device else 'by PIL'}; text encoder "
        f"{'with' if model.clip.transformer.grad_checkpointing else 'without'} activation checkpointing "
        f"({n_text:,} prompts a step)")
    with clear_errors():  # every training image is decoded here, once
        trainset = data.TrainSet(train_items, model.clip.visual.input_resolution, seed=cfg["seed"],
                                 device=device if on_device else None)
    loader = torch.utils.data.DataLoader(
        trainset, batch_size=cfg["batch_size"],
        shuffle=True, drop_last=len(train_items) >= cfg["batch_size"],
        generator=torch.Generator().manual_seed(cfg["seed"]))
    # APLe tunes its branches in sequence: stage I-a, stage I-b (each with KL to zero-shot CLIP),
    # then stage II jointly. CoOp and PMPO have one stage.
    stages = model.stages(cfg)
    warn_warmup_only_stages(stages, cfg, log)
    done = state["done"] if state else []  # [stage index, epoch] pairs finished in an earlier run
    for stage_index, (stage, epochs) in enumerate(stages):
        model.set_stage(stage)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
        scaler = torch.amp.GradScaler(enabled=args.precision == "fp16")
        if state and state["stage"] == stage_index:
            optimizer.load_state_dict(state["optimizer"])
        log(f"stage {stage!r}: {epochs} epochs, learning {sum(p.numel() for p in params):,} values")
        for epoch in range(epochs):
            if [stage_index, epoch] in done:
                continue
            if state:  # first epoch of a resumed run: continue the random streams where they stopped
                restore_rng(state, loader)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(*schedule_position(stages, stage_index, epoch, cfg), cfg)
            model.train()
            start, losses, terms = time.time(), [], {}  # terms: each loss term's sum over the epoch
            for step, (images, labels) in enumerate(loader):
                with autocast(args):
                    loss = model.loss(images.to(device), labels.to(device))
                if not torch.isfinite(loss):
                    raise SystemExit(f"error: the loss is {loss.item()} at stage {stage!r}, epoch {epoch + 1}, "
                                     f"step {step + 1}. Training stopped; the last good checkpoint is in {out}. "
                                     f"Try a lower --lr or --precision fp32.")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(loss.item())
                for k, v in model.loss_terms.items():
                    terms[k] = terms.get(k, 0.0) + v
            state = None  # a resumed run's optimizer and random state are used once
            done.append([stage_index, epoch])
            save_checkpoint(out, model, cfg, len(done))
            torch.save(dict(done=done, stage=stage_index, optimizer=optimizer.state_dict(), rng=rng_state(loader),
                            learned=learned_state(model)), os.path.join(out, "train_state.pt"))
            seconds = time.time() - start
            left = sum(e for _, e in stages) - len(done)
            means = ", ".join(f"{k} {float(v) / len(losses):.4f}" for k, v in terms.items())  # "ce 0.9, kl 0.1"
            log(f"stage {stage} epoch {epoch + 1}/{epochs}  loss {np.mean(losses):.4f} ({means})  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {seconds:.1f}s  ETA {left * seconds / 60:.1f} min")
    return len(done)


def harmonic_mean(base, novel):
    """HM = 2BN / (B + N), the base-to-novel summary number (CoCoOp, Sec. 4.1)."""
    return 2 * base * novel / (base + novel) if base + novel else 0.0


def rng_state(loader):
    """The random streams training draws from (numpy draws nothing after the shots are sampled)."""
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                loader=loader.generator.get_state(), crops=loader.dataset.generator.get_state())


def restore_rng(state, loader):
    rng = state["rng"]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    loader.generator.set_state(rng["loader"])
    loader.dataset.generator.set_state(rng["crops"])


def main(argv=None):
    args = parse_args(argv)
    method = args.method
    cfg = {**DEFAULTS, **METHODS[method].DEFAULTS}
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k in cfg})
    cfg.update(method=method, dataset=args.dataset, device=args.device, precision=args.precision)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"] or threads)
    try:
        return run(args, cfg)
    finally:
        torch.set_num_threads(threads)  # main() is also called from eval.py and the tests


def run(args, cfg):
    """Train and evaluate one run with settings cfg; returns its metrics."""
    method = args.method

    # Everything that can fail on bad input comes first, so a mistake leaves no run folder behind.
    ds = read_dataset(args.dataset, args.root)
    clip_model = load_frozen_clip(cfg["model"], args.device)
    set_seed(cfg["seed"])  # before sampling the shots and initialising the prompts, as in CoOp's train.py
    fewshot_train, fewshot_val = few_shot_data(ds, args, cfg)
    subsample = "base" if cfg["protocol"] == "base2novel" else "all"  # crossdataset: all ImageNet classes
    (train_items, _, test_items), classnames = data.subsample_classes(subsample, fewshot_train, fewshot_val, ds.test)
    model = build_method(method, clip_model, classnames, ds.template, cfg)

    out = args.out or os.path.join("runs", safe_name(args.dataset), method,
                                   cfg["protocol"], f"shots{cfg['shots']}_seed{cfg['seed']}")
    state = prepare_run_folder(out, cfg)
    log = Log(os.path.join(out, "log.txt"))
    if not os.path.exists(os.path.join(out, "fewshot.json")):
        data.save_fewshot(os.path.join(out, "fewshot.json"), fewshot_train, fewshot_val, ds.image_dir)
    if state:
        model.load_state_dict(state["learned"], strict=False)
        log(f"resuming {out} after {len(state['done'])} epochs")
    learned = {k: v.numel() for k, v in learned_state(model).items()}
    log(f"{method} on {args.dataset} ({cfg['protocol']}, {cfg['shots']} shots, seed {cfg['seed']}): "
        f"{len(train_items)} training images, {len(classnames)} classes")
    warn_short_classes(fewshot_train, cfg["shots"], log)
    log("learned tensors: " + ", ".join(f"{k} ({n:,})" for k, n in learned.items()))
    log(f"trainable parameters: {sum(learned.values()):,} (CLIP: frozen)")

    epochs_done = train(model, train_items, args, cfg, out, log, state)
    save_checkpoint(out, model, cfg, epochs_done)  # also when there was nothing to train (--epochs 0)

    metrics = {}
    if cfg["protocol"] == "base2novel":
        metrics["base_acc"] = evaluate(model, test_items, args, cfg)
        (_, _, novel_test), novel_names = data.subsample_classes("new", fewshot_train, fewshot_val, ds.test)
        novel = build_method(method, clip_model, novel_names, ds.template, cfg)
        novel.load_state_dict(model.state_dict(), strict=False)  # same prompts, class buffers rebuilt
        metrics["novel_acc"] = evaluate(novel, novel_test, args, cfg)
        metrics["hm"] = harmonic_mean(metrics["base_acc"], metrics["novel_acc"])
    else:
        metrics["accuracy"] = evaluate(model, test_items, args, cfg)
    log("results: " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if os.path.exists(os.path.join(out, "train_state.pt")):
        os.remove(os.path.join(out, "train_state.pt"))  # the run is complete; only the prompts are kept
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
