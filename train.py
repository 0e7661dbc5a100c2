"""Prompt learning for CLIP: every method of prompts/ (CoOp to PromptSRC, APLe, PMPO), one script.

    python train.py --method pmpo --dataset toy          # the built-in toy world: a laptop, a minute
    python train.py --method pmpo --dataset caltech101   # base-to-novel, 16 shots, seed 1
    python train.py --method coop --dataset oxford_pets --protocol fewshot --shots 4 --seed 2
    python train.py --method aple --dataset imagenet --protocol crossdataset  # then eval.py

The protocol is the CoOp family's (CoOp, CoCoOp, MaPLe, PromptSRC), so numbers compare with the
papers' tables: K shots per class drawn with the seed, SGD with one constant warm-up epoch and a
cosine schedule, the last epoch's prompts evaluated. CLIP is frozen by construction: only what a
method defines in prompts/<method>.py is learned, and only that is saved.

Everything a run used goes into its folder: config.json, fewshot.json (the exact shots),
log.txt, metrics.json and prompt_learner.pt (the learned tensors, config and class names).
"""
import argparse
import collections
import fcntl
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
from clip.files import atomic_write
from prompts import METHODS, clip_architecture, zeroshot
from prompts.common import OPTION_CHOICES, OPTION_HELP, Range, check_settings, learned_state
PROTOCOLS = ("base2novel", "fewshot", "crossdataset")
SWITCH = ("auto", "on", "off")

# -----------------------------------------------------------------------------
# Defaults shared by every method (the CoOp-family protocol). A method's own hyper-parameters
# (lr, batch size, epochs, prompt sizes) are DEFAULTS in prompts/<method>.py; every key of either
# can be set on the command line (--lr 0.001, --n_ctx 8, ...), with HELP as its help and CHOICES
# as its allowed values (numbers not listed there: >= 0), checked before a run folder exists.
DEFAULTS = dict(
    model="ViT-B/16", protocol="base2novel", shots=16, seed=1,
    momentum=0.9, weight_decay=5e-4, warmup_epochs=1, warmup_lr=1e-5,
    eval_batch_size=100, workers=min(8, os.cpu_count() or 1),
    threads=0,
    # Speed and memory switches (bench.py measures them). None changes what is learned beyond
    # float rounding.
    precision="auto", augment_on_device="auto", text_checkpointing="auto",
)
HELP = dict(
    model="an OpenAI CLIP name (downloaded once, sha256-checked) or a checkpoint path",
    protocol="base2novel: train on the base classes, test on base and novel (CoCoOp Sec. 4.1); "
             "fewshot: all classes; crossdataset: all classes, then eval.py on other data sets",
    shots="K training images per class (the papers use 16)",
    seed="the shots' draw and the prompts' init (the papers average seeds 1, 2, 3)",
    momentum="SGD momentum", weight_decay="SGD weight decay",
    warmup_epochs="epochs at the constant warmup_lr before the cosine schedule starts (Dassl's)",
    warmup_lr="learning rate of the warm-up epochs",
    eval_batch_size="test images per batch",
    workers="processes decoding test images (0: in this one)",
    threads="CPU threads of torch's kernels; 0: torch's default (one per core)",
    precision="auto: bf16 on a GPU, fp32 on the CPU (fp16 needs a GPU for its loss scaling)",
    augment_on_device="resize the random crops on the device instead of with PIL (auto: on a GPU)",
    text_checkpointing="recompute text-encoder activations in backward (auto: >= 4,000 prompts "
                       "a step)",
)
CHOICES = dict(protocol=PROTOCOLS, shots=Range(1), momentum=Range(0, 1), eval_batch_size=Range(1),
               precision=("auto", "fp32", "bf16", "fp16"), augment_on_device=SWITCH,
               text_checkpointing=SWITCH)
# On the built-in toy world (--dataset toy) these replace the DEFAULTS above, and
# prompts.TOY_DEFAULTS the method's own. Its CLIP is tiny: its matrices are too small to share out
# between cores, and a 600-image test set is read faster in this process than by worker processes
# that have to start first.
TOY = dict(model="toy", threads=1, workers=0)
# -----------------------------------------------------------------------------


# -- one run, from the command line to metrics.json ---------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    method = args.method
    cfg = {**DEFAULTS, **METHODS[method].DEFAULTS}
    given = {k: v for k, v in vars(args).items() if k in cfg}
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in given.items()})
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
    cfg["clip_sha256"] = clip.clip.sha256(cfg["model"])  # a rerun with another CLIP is refused
    set_seed(cfg["seed"])  # before the shots and the prompts' init, as CoOp's train.py
    fewshot_train, fewshot_val = few_shot_data(ds, args, cfg)
    out = args.out or os.path.join("runs", safe_name(args.dataset), method,
                                   cfg["protocol"], f"shots{cfg['shots']}_seed{cfg['seed']}")
    fewshot_train, fewshot_val = recorded_shots(out, ds, fewshot_train, fewshot_val)
    subsample = "base" if cfg["protocol"] == "base2novel" else "all"  # crossdataset: all ImageNet
    (train_items, _, test_items), classnames = data.subsample_classes(subsample, fewshot_train,
                                                                      fewshot_val, ds.test)
    (_, _, novel_test), novel_names = data.subsample_classes("new", fewshot_train, fewshot_val,
                                                             ds.test)
    if cfg["protocol"] == "base2novel" and not novel_test:
        raise SystemExit(f"error: {args.dataset} has {len(classnames)} class(es) with test "
                         f"images, too few to split into base and novel; use --protocol fewshot")
    if not test_items:
        raise SystemExit(f"error: {args.dataset} has no test images for its {subsample} classes")
    model = build_method(method, clip_model, classnames, ds.template, cfg)

    state = prepare_run_folder(out, cfg, model.stages(cfg))
    log = Log(os.path.join(out, "log.txt"))
    fewshot_path = os.path.join(out, "fewshot.json")
    if state is None or not os.path.exists(fewshot_path):  # it always holds the shots trained on
        with write_errors(fewshot_path):
            data.save_fewshot(fewshot_path, fewshot_train, fewshot_val, ds.image_dir)
    if state:
        model.load_state_dict(state["learned"], strict=False)
        if state.get("note"):
            log(state["note"])
        log(f"resuming {out} after {len(state['done'])} epochs")
    learned = {k: v.numel() for k, v in learned_state(model).items()}
    log(f"{method} on {args.dataset} ({cfg['protocol']}, {cfg['shots']} shots, "
        f"seed {cfg['seed']}): "
        f"{len(train_items)} training images, {len(classnames)} classes")
    warn_short_classes(fewshot_train, cfg["shots"], log)
    for names in data.duplicate_classnames(ds.train, ds.val, ds.test):
        log(f"warning: CLIP cannot tell these classes apart, their prompts are the same: "
            f"{', '.join(names)}")
    log("learned tensors: " + ", ".join(f"{k} ({n:,})" for k, n in learned.items()))
    log(f"trainable parameters: {sum(learned.values()):,} (CLIP: frozen)")

    epochs_done = train(model, train_items, args, cfg, out, log, state)
    save_checkpoint(out, model, cfg, epochs_done)  # also with nothing to train (--epochs 0)

    metrics = {}
    if cfg["protocol"] == "base2novel":
        metrics["base_acc"] = evaluate(model, test_items, args, cfg)
        novel = build_method(method, clip_model, novel_names, ds.template, cfg)
        novel.load_state_dict(model.state_dict(), strict=False)  # same prompts, new class buffers
        metrics["novel_acc"] = evaluate(novel, novel_test, args, cfg)
        metrics["hm"] = harmonic_mean(metrics["base_acc"], metrics["novel_acc"])
    else:
        metrics["accuracy"] = evaluate(model, test_items, args, cfg)
    log("results: " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    if args.dataset == "toy" and cfg["protocol"] == "base2novel":  # seconds on the toy: a yardstick
        zs = zeroshot_metrics(clip_model, ds, args, cfg)
        log("zero-shot CLIP on the same test images: "
            + "  ".join(f"{k} {v:.2f}" for k, v in zs.items()))
    save_json(os.path.join(out, "metrics.json"), metrics)
    if os.path.exists(os.path.join(out, "train_state.pt")):
        os.remove(os.path.join(out, "train_state.pt"))  # complete: only the prompts are kept
    unlock_run_folder(out)
    log(f"run folder: {out}")
    return metrics


# -- train and evaluate ---------------------------------------------------------------------------

def train(model, train_items, args, cfg, out, log, state=None):
    """SGD over the learned tensors, stage by stage, a checkpoint after every epoch; returns the
    epochs done."""
    device = args.device
    on_device = switch_on(cfg, "augment_on_device", auto=device.startswith("cuda"))
    n_text = model.text_prompts_per_step(cfg["batch_size"])
    # Saved activations of a bf16 step, ~2.7 MB per prompt (PMPO, 500 classes x 4 prompts: 5.3 GiB,
    # counted with saved-tensor hooks). From 4,000 prompts on (PMPO on all 1,000 ImageNet classes)
    # that outgrows a 16 GB card.
    checkpointing = switch_on(cfg, "text_checkpointing", auto=n_text >= 4000)
    model.clip.transformer.grad_checkpointing = checkpointing
    log(f"precision {args.precision}; crops resized {'on ' + device if on_device else 'by PIL'}; "
        f"text encoder {'with' if checkpointing else 'without'} activation checkpointing "
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
        optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"],
                                    weight_decay=cfg["weight_decay"])
        scaler = torch.amp.GradScaler(enabled=args.precision == "fp16")
        if state and state["stage"] == stage_index:
            optimizer.load_state_dict(state["optimizer"])
        log(f"stage {stage!r}: {epochs} epochs, learning {sum(p.numel() for p in params):,} "
            f"values")
        for epoch in range(epochs):
            if [stage_index, epoch] in done:
                continue
            if state:  # first epoch of a resumed run: the random streams go on where they stopped
                restore_rng(state, loader)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(*schedule_position(stages, stage_index, epoch, cfg), cfg)
            model.train()
            start, losses, terms = time.time(), [], {}  # terms: each loss term's epoch sum
            progress = Progress(f"stage {stage} epoch {epoch + 1}/{epochs}", len(loader))
            for step, (images, labels) in enumerate(loader):
                # forward: the method's loss (cross-entropy and its own terms) on a batch
                with autocast(args):
                    loss = model.loss(images.to(device), labels.to(device))
                # a NaN loss would spread into every prompt: stop while the last checkpoint is good
                if not torch.isfinite(loss):
                    raise SystemExit(f"error: the loss is {loss.item()} at stage {stage!r}, epoch "
                                     f"{epoch + 1}, step {step + 1}. Training stopped; "
                                     f"{last_good(out)}. "
                                     f"Try a lower --lr or --precision fp32.")
                # backward and SGD step; the scaler only scales under fp16 (bf16, fp32 need none)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                # a finite loss can still give an infinite gradient: check what was learned, too
                if not torch.stack([p.detach().isfinite().all() for p in params]).all():
                    raise SystemExit(f"error: step {step + 1} of stage {stage!r}, epoch "
                                     f"{epoch + 1} made the learned tensors NaN or infinite "
                                     f"(the loss was {loss.item():.4g}). Training stopped; "
                                     f"{last_good(out)}. Try a lower --lr or --precision fp32.")
                # bookkeeping for the epoch's log line: the loss and each of its terms
                losses.append(loss.item())
                for k, v in model.loss_terms.items():
                    terms[k] = terms.get(k, 0.0) + v
                progress(step + 1, len(labels))
            progress.close()
            state = None  # a resumed run's optimizer and random state are used once
            model.on_epoch_end(epoch, epochs)  # e.g. PromptSRC's prompt averaging (GPA)
            done.append([stage_index, epoch])
            save_checkpoint(out, model, cfg, len(done))
            save_torch(os.path.join(out, "train_state.pt"), dict(
                done=done, stage=stage_index, optimizer=optimizer.state_dict(),
                rng=rng_state(loader),
                learned=learned_state(model, buffers=True)))  # buffers: PromptSRC's GPA sum
            seconds = time.time() - start
            left = sum(e for _, e in stages) - len(done)
            # "ce 0.9, kl 0.1"
            means = ", ".join(f"{k} {float(v) / len(losses):.4f}" for k, v in terms.items())
            log(f"stage {stage} epoch {epoch + 1}/{epochs}  loss {np.mean(losses):.4f} ({means})  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {seconds:.1f}s  "
                f"ETA {left * seconds / 60:.1f} min")
    return len(done)


@torch.no_grad()
def evaluate(model, items, args, cfg):
    """Top-1 accuracy (%) on items; the class features are computed once, then images stream by."""
    if not items:
        raise SystemExit("error: there are no test images to evaluate on")
    model.eval()
    device = args.device
    correct = total = 0
    n_px = model.clip.visual.input_resolution
    loader = data.test_loader(items, n_px, cfg["eval_batch_size"], cfg["workers"])
    progress = Progress(f"evaluating {len(items)} images", len(loader))
    with autocast(args), clear_errors():  # an unreadable test image: its name, not a traceback
        text_features = model.text_features()
        for step, (images, labels) in enumerate(loader):
            logits = model.logits(images.to(device), text_features)
            correct += (logits.argmax(-1).cpu() == labels).sum().item()
            total += len(labels)
            progress(step + 1, len(labels))
    progress.close()
    return 100.0 * correct / total


def zeroshot_metrics(clip_model, ds, args, cfg):
    """Zero-shot CLIP on a data set's base and novel test images: base_acc, novel_acc, hm."""
    metrics = {}
    for subsample, key in (("base", "base_acc"), ("new", "novel_acc")):
        (_, _, test), classnames = data.subsample_classes(subsample, ds.train, ds.val, ds.test)
        model = zeroshot.CustomCLIP(clip_model, classnames, ds.template).to(args.device)
        metrics[key] = evaluate(model, test, args, cfg)
    metrics["hm"] = harmonic_mean(metrics["base_acc"], metrics["novel_acc"])
    return metrics


def last_good(out):
    if trained_in(out):
        return f"the last good checkpoint is in {out}"
    return f"no epoch had finished, so the same command with other settings starts {out} over"


def harmonic_mean(base, novel):
    """HM = 2BN / (B + N), the base-to-novel summary number (CoCoOp, Sec. 4.1)."""
    return 2 * base * novel / (base + novel) if base + novel else 0.0


def rng_state(loader):
    """The random streams training draws from (numpy draws nothing after the shots are sampled)."""
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                loader=loader.generator.get_state(), crops=loader.dataset.generator.get_state())


def restore_rng(state, loader):
    rng = state["rng"]
    if rng is None:  # resumed from a checkpoint (train_state.pt was damaged): streams start afresh
        return
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    loader.generator.set_state(rng["loader"])
    loader.dataset.generator.set_state(rng["crops"])


# -- the command line ----------------------------------------------------------------------------

def parse_args(argv=None):
    """--method decides which method's options exist; --help without it describes every method."""
    argv = [flag_style(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method")
    pre.add_argument("-h", "--help", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.help and known.method not in METHODS:  # every method's options, one section each
        p = build_parser()
        p.epilog, flags_note = None, p.epilog
        methods = "".join("\n" + method_help(name) for name in METHODS)
        print(p.format_help() + methods + "\n" + flags_note)
        raise SystemExit(0)
    if known.method not in METHODS:
        given = "" if known.method is None else f" (got {known.method!r})"
        raise SystemExit(f"error: --method must be one of {', '.join(METHODS)}{given}; "
                         f"`python train.py --help` describes them")
    p = build_parser(known.method)
    args = p.parse_args(argv)
    method = METHODS[known.method]
    keys = {**DEFAULTS, **method.DEFAULTS}
    given = {k: v for k, v in vars(args).items() if k in keys and v is not None}  # the flags given
    vars(args).update(settings(args.method, args.dataset, given), given=set(given))
    check_values(p, args, DEFAULTS, CHOICES)
    check_values(p, args, method.DEFAULTS, {**OPTION_CHOICES, **getattr(method, "CHOICES", {})})
    check_device(p, args)
    if args.out == "":
        p.error("--out is empty; leave it out for the default run folder")
    return args


def shared_defaults(dataset):
    """The DEFAULTS above, with TOY's on the toy world (eval.py's defaults too)."""
    return {**DEFAULTS, **(TOY if dataset == "toy" else {})}


def settings(method, dataset, given):
    """A run's settings, each from the first of: the flags given; what the method's family uses for
    this
    protocol, data set and K (prompts.protocol_defaults, e.g. CoOp's 50 epochs on ImageNet); on the
    built-in toy world, its tiny CLIP and the method's prompts.TOY_DEFAULTS; the method's DEFAULTS;
    the DEFAULTS above."""
    toy = prompts.TOY_DEFAULTS.get(method, {}) if dataset == "toy" else {}
    cfg = {**shared_defaults(dataset), **METHODS[method].DEFAULTS, **toy, **given}
    protocol = prompts.protocol_defaults(method, cfg["protocol"], dataset, cfg["shots"])
    return {**cfg, **protocol, **given}


def flag_style(arg):
    """--batch-size -> --batch_size: a flag may be spelled with - or _ (values are left alone)."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


def build_parser(method=None):
    """train.py's flags: the run's, the protocol's (DEFAULTS) and `method`'s (its DEFAULTS)."""
    epilog = ("Defaults are base-to-novel's; other protocols and data sets change some "
              "(prompts.protocol_defaults), and a flag given wins. Flags take - or _ alike "
              "(--batch-size = --batch_size). `--method NAME --help` shows one method's options.")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog,
                                allow_abbrev=False)
    p.add_argument("--method", required=True, choices=list(METHODS), help="the prompt learner")
    p.add_argument("--dataset", required=True,
                   help=f"one of {', '.join(data.DATASETS)}, or folder:/path")
    p.add_argument("--root", default=os.environ.get("DATA", "data_root"),
                   help="data sets folder ($DATA)")
    p.add_argument("--out",
                   help="run folder (default runs/<dataset>/<method>/<protocol>/shots<K>_seed<S>)")
    p.add_argument("--fewshot_file", help="a fewshot.json to train on instead of sampling shots")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, mps")
    add_options(p.add_argument_group("protocol options (every method)"), DEFAULTS, HELP, CHOICES)
    if method:
        add_method_options(p, method)
    return p


def add_method_options(parser, method):
    module = METHODS[method]
    summary = (module.__doc__ or "").strip().split("\n")[0]
    group = parser.add_argument_group(f"--method {method}", summary)
    helps = {**OPTION_HELP, **getattr(module, "HELP", {})}
    choices = {**OPTION_CHOICES, **getattr(module, "CHOICES", {})}  # CHOICES: optional
    add_options(group, module.DEFAULTS, helps, choices)


def method_help(method):
    """The help of one method's options alone (train.py --help lists every method's)."""
    p = argparse.ArgumentParser(usage=argparse.SUPPRESS, add_help=False)
    add_method_options(p, method)
    return p.format_help()


def add_options(group, defaults, helps, choices):
    """One flag per key of defaults; its type, and a tuple's number of values, from the default.
    Parsed as None when not given, so that a flag given wins over the protocol's settings."""
    for key, default in defaults.items():
        allowed = choices.get(key)
        shown = (" ".join(map(str, default)) if isinstance(default, tuple)
                 else "''" if default == ""
                 else ("yes" if default else "no") if isinstance(default, bool) else str(default))
        shown += f"; {allowed}" if isinstance(allowed, Range) else ""
        text = f"{helps.get(key, '')} (default: {shown})"
        kwargs = dict(default=None, help=text.replace("%", "%%"))
        if isinstance(default, bool):
            kwargs.update(type=yes_no, metavar="yes|no")
        elif isinstance(default, tuple):
            kwargs.update(type=type(default[0]), nargs=len(default))
        else:
            metavar = "|".join(allowed) if isinstance(allowed, tuple) else None
            kwargs.update(type=type(default), metavar=metavar)
        group.add_argument(f"--{key}", **kwargs)


def yes_no(text):
    answer = dict(yes=True, true=True, on=True, no=False, false=False, off=False).get(text.lower())
    answer = {"1": True, "0": False}.get(text, answer)
    if answer is None:
        raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")
    return answer


def check_values(parser, args, defaults, choices):
    """Every value in its CHOICES; a number not listed there must be >= 0 (and finite)."""
    try:
        check_settings(vars(args), defaults, choices)
    except ValueError as e:
        parser.error(str(e))


def check_device(parser, args):
    """--device must exist here; --precision auto becomes bf16 on a GPU, fp32 on the CPU."""
    if device_error(args.device):
        parser.error(device_error(args.device))
    args.precision = default_precision(args.device) if args.precision == "auto" else args.precision
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        parser.error("--precision fp16 needs a CUDA device (its loss scaling runs there); "
                     "use bf16 or fp32")


def device_error(device):
    """Why torch cannot compute on `device` here, or None."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps)"
    if d.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA GPU is available here; use --device cpu"
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        return f"--device {device}: there are {torch.cuda.device_count()} GPUs (cuda:0 ...)"
    if d.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {device}: MPS is not available here; use --device cpu"
    if d.type not in ("cpu", "cuda", "mps"):
        return f"--device {device}: only cpu, cuda[:N] and mps are supported"
    return None


# -- setup ---------------------------------------------------------------------------------------

def safe_name(name):
    """A data set or model name as one folder name: "folder:/data/x" -> "folder__data_x",
    "ViT-B/16" -> "ViT-B_16"."""
    return name.replace(":", "_").replace("/", "_")


def default_precision(device):
    return "bf16" if device.startswith("cuda") else "fp32"


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def clear_errors():
    """Bad input (no data set where it should be, a damaged checkpoint, an unreadable image) ends
    the run with the message that says what to do, not with a traceback. Wraps only the calls that
    read input."""
    try:
        yield
    except (ValueError, RuntimeError, OSError) as e:
        message = str(e).strip()
        if "Original Traceback" in message:  # from a DataLoader worker: the last line is the error
            message = message.splitlines()[-1]
        if len(message) > 1000:  # e.g. a 5,000-letter --ctx_init quoted back
            message = message[:600] + " [...] " + message[-300:]
        raise SystemExit(f"error: {message}") from None


def load_frozen_clip(name, device):
    with clear_errors():
        model, _ = clip.load(name, device=device)
    check_finite(model.state_dict(), f"the CLIP weights {name}")
    return model.requires_grad_(False).eval()  # frozen by construction: CLIP gets no gradient


def check_finite(tensors, source):
    """Stop, naming them, if loaded tensors hold NaN or infinity (chance-level results)."""
    bad = [k for k, t in tensors.items()
           if torch.is_tensor(t) and t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise SystemExit(f"error: {source}: NaN or infinite values in {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}; the file is damaged or was trained "
                         f"with a too-high lr")


def build_method(method, clip_model, classnames, template, cfg):
    with clear_errors():  # settings that do not fit this CLIP (e.g. PMPO prompts > vision layers)
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
    """(epoch, epochs) of lr_at for `epoch` of stage `stage_index`. With several stages (APLe),
    either one warm-up and one cosine run over all of them ("one"), or each stage restarts its own
    ("restart"); `stage_schedule` decides. With one stage the two are the same."""
    if cfg.get("stage_schedule", "one") == "restart":
        return epoch, stages[stage_index][1]
    return sum(e for _, e in stages[:stage_index]) + epoch, sum(e for _, e in stages)


def warn_warmup_only_stages(stages, cfg, log):
    """A stage whose every epoch runs at warmup_lr learns next to nothing: say so."""
    restart = cfg.get("stage_schedule") == "restart"
    fix = "--stage_schedule one" if restart else "fewer --warmup_epochs"
    for i, (stage, epochs) in enumerate(stages):
        last = schedule_position(stages, i, epochs - 1, cfg)[0]  # its last epoch's place
        if epochs and last < cfg["warmup_epochs"]:
            log(f"warning: stage {stage!r} has no epoch after the warm-up: all its {epochs} "
                f"epoch(s) run at --warmup_lr {cfg['warmup_lr']:g} and learn next to nothing. "
                f"Give it more epochs, or {fix}.")


# -- data ----------------------------------------------------------------------------------------

def read_dataset(name, root):
    with clear_errors():
        return data.build_dataset(name, root)


def few_shot_data(ds, args, cfg):
    """K-shot train and val lists over all classes: CoOp's draw for (split, K, seed), or
    --fewshot-file's."""
    if not ds.train:
        raise SystemExit(f"error: {args.dataset} is test-only; train on another data set and use "
                         f"eval.py on it.")
    if not args.fewshot_file:
        return data.fewshot_split(ds.train, ds.val, cfg["shots"], cfg["seed"])
    try:
        train, val = data.load_fewshot(args.fewshot_file, ds.image_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --fewshot_file {args.fewshot_file} is not a fewshot.json of "
                         f"train.py ({type(e).__name__}: {e})") from None
    if not train:
        raise SystemExit(f"error: --fewshot_file {args.fewshot_file} lists no training images")
    shots = max(collections.Counter(item.label for item in train).values())  # the file decides K
    # e.g. CoOp's epochs, which follow K
    follow = prompts.protocol_defaults(cfg["method"], cfg["protocol"], args.dataset, shots)
    cfg.update({k: v for k, v in follow.items() if k not in args.given},
               shots=shots, fewshot_file=os.path.abspath(args.fewshot_file))
    return train, val


def recorded_shots(out, ds, train, val):
    """On resume, the shots the run started with (its fewshot.json), even if the data changed."""
    path = os.path.join(out, "fewshot.json")
    if not trained_in(out) or not os.path.isfile(path) or finished(out):  # today's draw
        return train, val
    try:
        recorded = data.load_fewshot(path, ds.image_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path} is damaged ({type(e).__name__}: {e}). Delete that file "
                         f"and run the same command again to draw the shots from --seed anew (the "
                         f"same draw if the data set is unchanged), or delete {out} to start "
                         f"over.") from None
    for item in recorded[0] + recorded[1]:
        now = ds.classnames[item.label] if 0 <= item.label < len(ds.classnames) else None
        if now != data.prompt_name(item.classname):
            raise SystemExit(f"error: {path} records label {item.label} as "
                             f"{item.classname!r}, but {ds.name} now has {now!r} there: the data "
                             f"set changed since this run started. Restore it, or delete {out} "
                             f"to start over.")
    if [(d.impath, d.label) for d in recorded[0]] != [(d.impath, d.label) for d in train]:
        print(f"note: training on the shots recorded in {path}, not on today's draw "
              f"(the data set changed)")
    return recorded


def warn_short_classes(train_items, shots, log):
    """CoOp keeps every image of a class smaller than K without a word; say so."""
    counts = collections.Counter(item.classname for item in train_items)
    short = {name: n for name, n in counts.items() if n < shots}
    if short:
        log(f"warning: {len(short)} classes have fewer than --shots {shots} training images and "
            f"use "
            f"all they "
            f"have: " + ", ".join(f"{name} ({n})" for name, n in list(short.items())[:10]))


# -- the run folder: resume or refuse, never overwrite ------------------------------------------
# Every file goes through clip.files.atomic_write: a kill or a full disk leaves the previous
# version of each, so the same command resumes after the last finished epoch. log.txt is appended.

RUN_FILES = ("config.json", "fewshot.json", "log.txt", "metrics.json", "prompt_learner.pt",
             "train_state.pt", ".lock")


@contextmanager
def write_errors(path):
    """A full disk or a folder that cannot be written: a message, not a traceback."""
    try:
        yield
    except OSError as e:
        raise SystemExit(f"error: could not write {path}: {e.strerror or e}. The files written "
                         f"before are intact: make room (or fix the folder) and run the same "
                         f"command again to continue.") from None


def save_json(path, obj):
    with write_errors(path), atomic_write(path) as f:
        json.dump(obj, f, indent=2)


def save_torch(path, obj):
    with write_errors(path), atomic_write(path, "wb") as f:
        torch.save(obj, f)


def read_json(path):
    """The JSON at path, or None if it is missing or damaged (e.g. 0 bytes after a full disk)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_out_folder(out):
    """--out must be (or become) a folder this process can write in; checked before it is made."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --out {out} is a file; give a folder for the run")
    if unwritable(out):
        raise SystemExit(f"error: --out {out} cannot be made: {unwritable(out)}")


def unwritable(path):
    """Why `path` (a folder, or a file or folder to be made) cannot be written here, or None."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} cannot be written (read-only?)"
    return None


def prepare_run_folder(out, cfg, stages):
    """Create `out`, or resume the unfinished run with the same settings in it; hold its lock.
    Returns the saved training state (None for a new run)."""
    check_out_folder(out)
    old = recorded_config(out)
    if finished(out):
        raise SystemExit(f"error: {out} already holds a finished run (metrics.json)"
                         f"{other_clip(old, cfg)}. Pick another --out, or delete that folder to run again.")
    speed = ("device", "workers", "threads")  # may change between a run and its resume
    changed = {k: (old.get(k), v) for k, v in cfg.items()
               if old.get(k) != v and k not in speed} if old is not None else {}
    if changed and trained_in(out):
        differences = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise SystemExit(f"error: {out} holds an unfinished run with other settings "
                         f"({differences}). Pick another --out, or delete that folder.")
    foreign = [name for name in (os.listdir(out) if os.path.isdir(out) else [])
               if name not in RUN_FILES and not name.endswith(".tmp")]
    if old is None and foreign:
        raise SystemExit(f"error: {out} exists and is not a run folder of this script; "
                         f"pick another --out.")
    with write_errors(out):
        os.makedirs(out, exist_ok=True)
    lock_run_folder(out)
    for name in os.listdir(out):  # what a killed process was writing (atomic_write's temp names)
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(out, name))
    if changed:  # a run stopped before its first epoch ended (bad image, NaN): nothing to keep
        print(f"note: {out} holds no finished epoch of its earlier settings; starting it over")
    if changed or read_json(os.path.join(out, "config.json")) is None:  # or new, or restored above
        save_json(os.path.join(out, "config.json"), cfg)
    return load_train_state(out, stages)


def other_clip(old, cfg):
    """", made with another CLIP (...)" when the recorded run's CLIP file is not this one, else ""."""
    if old is None or old.get("clip_sha256") == cfg["clip_sha256"]:
        return ""
    return (f", made with another CLIP (sha256 {old.get('clip_sha256') or 'not recorded'}; "
            f"{cfg['model']} now is {cfg['clip_sha256']})")


def finished(out):
    """metrics.json is written last; a damaged one (a disk error) means: evaluate again."""
    return isinstance(read_json(os.path.join(out, "metrics.json")), dict)


def trained_in(out):
    """Whether the run in `out` has finished an epoch (or its --epochs 0): then it keeps its
    settings and its shots."""
    return any(os.path.exists(os.path.join(out, name))
               for name in ("prompt_learner.pt", "train_state.pt"))


def recorded_config(out):
    """The settings of the run in `out`: config.json, or the checkpoint's copy if it is damaged."""
    path = os.path.join(out, "config.json")
    config = read_json(path)
    if config is not None or not os.path.exists(path):
        return config
    try:
        ckpt_path = os.path.join(out, "prompt_learner.pt")
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)["config"]
    except Exception:  # no readable checkpoint: only a run without a finished epoch restarts
        if os.path.exists(os.path.join(out, "train_state.pt")):
            raise SystemExit(f"error: {path} is damaged and no checkpoint holds the run's "
                             f"settings; delete the folder {out} to start the run over") from None
        return None


def load_train_state(out, stages):
    path = os.path.join(out, "train_state.pt")
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:
        return checkpoint_state(out, stages, f"{path} is damaged ({type(e).__name__})")
    check_finite(state["learned"], path)
    return state


def checkpoint_state(out, stages, damage):
    """A damaged train_state.pt: go on from the last checkpoint's prompts, so no more than the
    interrupted epoch is lost. Only the SGD momentum and the random streams start afresh."""
    path = os.path.join(out, "prompt_learner.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        learned, epochs_done = ckpt["state_dict"], ckpt["epoch"]
    except Exception:
        raise SystemExit(f"error: {damage}, and {path} cannot be read either. Delete both and "
                         f"run the same command again: the run restarts from its first epoch, "
                         f"with its settings and shots kept.") from None
    check_finite(learned, path)
    epochs = [[i, epoch] for i, (_, n) in enumerate(stages) for epoch in range(n)]
    return dict(done=epochs[:epochs_done], stage=None, rng=None, learned=learned,
                note=f"warning: {damage}; going on from prompt_learner.pt with a fresh SGD "
                     f"momentum and random stream, so the prompts will differ slightly from an "
                     f"uninterrupted run's")


RUN_LOCKS = {}  # run folder -> its open .lock file, held until the run ends (a kill drops it)


def lock_run_folder(out):
    """One process per run folder: a second train.py on the same --out is refused."""
    key = os.path.abspath(out)
    if key in RUN_LOCKS:  # an earlier run of this process ended in an exception: still ours
        return
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise SystemExit(f"error: another process (pid {pid}) is running in {out}; wait for it "
                         f"to end, or pick another --out") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    RUN_LOCKS[key] = f


def unlock_run_folder(out):
    f = RUN_LOCKS.pop(os.path.abspath(out), None)
    if f:
        os.remove(f.name)
        f.close()


class Progress:
    """Progress inside a loop over batches: step, images/s and ETA on stderr (not in log.txt).
    On a terminal one line rewrites itself (at most 5 times a second); otherwise a plain line
    every minute."""

    def __init__(self, what, steps, every=60.0):
        self.what, self.steps, self.images = what, steps, 0
        self.tty = sys.stderr.isatty()
        self.every = 0.2 if self.tty else every
        self.start = self.shown = time.time()

    def __call__(self, step, images):
        """After `step` of `steps` batches, the last one of `images` images."""
        self.images += images
        now = time.time()
        if now - self.shown < self.every and step < self.steps:
            return
        self.shown, seconds = now, max(now - self.start, 1e-9)
        eta = (self.steps - step) * seconds / step
        line = (f"{self.what}  step {step}/{self.steps}  {self.images / seconds:.1f} img/s  "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        sys.stderr.write(f"\r{line}\033[K" if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty:  # the line goes; the loop logs its own summary
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


class Log:
    def __init__(self, path):
        self.path = path
        with write_errors(path):
            self.file = open(path, "a")

    def __call__(self, msg):
        print(msg, flush=True)
        with write_errors(self.path):
            self.file.write(msg + "\n")
            self.file.flush()


def save_checkpoint(out, model, cfg, epochs_done):
    """Only the learned tensors (KB to a few MB), never CLIP, and what is needed to use them."""
    save_torch(os.path.join(out, "prompt_learner.pt"), dict(
        method=cfg["method"], config=cfg, classnames=model.classnames, epoch=epochs_done,
        clip_architecture=clip_architecture(model.clip), state_dict=learned_state(model)))


if __name__ == "__main__":
    main(sys.argv[1:])
