"""Prompt learning for CLIP: every method of prompts/ (CoOp to PromptSRC, APLe, PMPO), one script.

    python train.py --method pmpo --dataset toy          # the built-in toy world: a laptop, minutes
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

import collections
import math
import os
import random
import sys
import time

import numpy as np
import torch

import clip
import data
import prompts
from checkpoint import check_finite, expected_state, save_checkpoint, save_torch
from console import Log, Progress, clear_errors, interrupted, write_errors
from options import parse_args
from prompts import zeroshot
from prompts.common import learned_state
from runfolder import (last_good, prepare_run_folder, recorded_shots, restore_rng, rng_state,
                       safe_name, save_json, unlock_run_folder)
from speed import GraphedStep, autocast, keep_in_precision, graphs_on, switch_on
from tables import harmonic_mean


# -- one run, from the command line to metrics.json ---------------------------------------------

def main(argv=None):
    cfg = parse_args(argv)  # every setting of the run, resolved and checked (options.py)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"] or threads)
    try:
        return run(cfg)
    finally:
        torch.set_num_threads(threads)  # main() is also called from eval.py and the tests


def run(cfg):
    """Train and evaluate one run with settings cfg; returns its metrics."""
    method, dataset, device = cfg["method"], cfg["dataset"], cfg["device"]

    # Everything that can fail on bad input comes first, so a mistake leaves no run folder behind.
    ds = read_dataset(dataset, cfg["root"])
    clip_model = keep_in_precision(load_frozen_clip(cfg["model"], device), cfg)
    cfg["clip_sha256"] = clip.clip.sha256(cfg["model"])  # a rerun with another CLIP is refused
    set_seed(cfg["seed"])  # before the shots and the prompts' init, as CoOp's train.py
    fewshot_train, fewshot_val = few_shot_data(ds, cfg)
    out = cfg["out"] = cfg["out"] or os.path.join("runs", safe_name(dataset), method,
                                                  cfg["protocol"],
                                                  f"shots{cfg['shots']}_seed{cfg['seed']}")
    fewshot_train, fewshot_val = recorded_shots(out, ds, fewshot_train, fewshot_val)
    subsample = "base" if cfg["protocol"] == "base2novel" else "all"  # crossdataset: all ImageNet
    (train_items, _, test_items), classnames = data.subsample_classes(subsample, fewshot_train,
                                                                      fewshot_val, ds.test)
    (_, _, novel_test), novel_names = data.subsample_classes("new", fewshot_train, fewshot_val,
                                                             ds.test)
    if cfg["protocol"] == "base2novel" and not novel_test:
        raise SystemExit(f"error: {dataset} has {len(classnames)} class(es) with test "
                         f"images, too few to split into base and novel; use --protocol fewshot")
    if not test_items:
        raise SystemExit(f"error: {dataset} has no test images for its {subsample} classes")
    model = build_method(method, clip_model, classnames, ds.template, cfg)

    state = prepare_run_folder(out, cfg, model.stages(cfg), expected_state(model, cfg))
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
    log(f"{method} on {dataset} ({cfg['protocol']}, {cfg['shots']} shots, "
        f"seed {cfg['seed']}): "
        f"{len(train_items)} training images, {len(classnames)} classes")
    warn_short_classes(fewshot_train, cfg["shots"], log)
    for names in data.duplicate_classnames(ds.train, ds.val, ds.test):
        log(f"warning: CLIP cannot tell these classes apart, their prompts are the same: "
            f"{', '.join(names)}")
    left_out = data.classes_left_out(fewshot_train, ds.test)
    if cfg["protocol"] == "base2novel" and left_out:  # CoOp splits train's labels only
        log(f"warning: {len(left_out)} class(es) have test images but no training images, so "
            f"they are neither base nor novel and not evaluated (as CoOp): "
            f"{', '.join(left_out[:10])}")
    log("learned tensors: " + ", ".join(f"{k} ({n:,})" for k, n in learned.items()))
    log(f"trainable parameters: {sum(learned.values()):,} (CLIP: frozen)")

    epochs_done = train(model, train_items, cfg, out, log, state)
    save_checkpoint(out, model, cfg, epochs_done)  # also with nothing to train (--epochs 0)

    metrics = {}
    if cfg["protocol"] == "base2novel":
        metrics["base_acc"] = evaluate(model, test_items, cfg)
        novel = build_method(method, clip_model, novel_names, ds.template, cfg)
        novel.load_state_dict(model.state_dict(), strict=False)  # same prompts, new class buffers
        metrics["novel_acc"] = evaluate(novel, novel_test, cfg)
        metrics["hm"] = harmonic_mean(metrics["base_acc"], metrics["novel_acc"])
    else:
        metrics["accuracy"] = evaluate(model, test_items, cfg)
    log("results: " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    if dataset == "toy" and cfg["protocol"] == "base2novel":  # seconds on the toy: a yardstick
        zs = zeroshot_metrics(clip_model, ds, cfg)
        log("zero-shot CLIP on the same test images: "
            + "  ".join(f"{k} {v:.2f}" for k, v in zs.items()))
    save_json(os.path.join(out, "metrics.json"), metrics)
    if os.path.exists(os.path.join(out, "train_state.pt")):
        os.remove(os.path.join(out, "train_state.pt"))  # complete: only the prompts are kept
    unlock_run_folder(out)
    log(f"run folder: {out}")
    return metrics


# -- train and evaluate ----------------------------------------------------------------------------

def train(model, train_items, cfg, out, log, state=None):
    """SGD over the learned tensors, stage by stage, a checkpoint after every epoch; returns the
    epochs done."""
    device = cfg["device"]
    on_device = switch_on(cfg, "augment_on_device", auto=device.startswith("cuda"))
    n_text = model.text_prompts_per_step(cfg["batch_size"])
    # Saved activations of a bf16 step, ~2.7 MB per prompt (PMPO, 500 classes x 4 prompts: 5.3 GiB,
    # counted with saved-tensor hooks). From 4,000 prompts on (PMPO on all 1,000 ImageNet classes)
    # that outgrows a 16 GB card.
    checkpointing = switch_on(cfg, "text_checkpointing", auto=n_text >= 4000)
    model.clip.transformer.grad_checkpointing = checkpointing
    log(f"precision {cfg['precision']}; crops resized {'on ' + device if on_device else 'by PIL'}; "
        f"text encoder {'with' if checkpointing else 'without'} activation checkpointing "
        f"({n_text:,} prompts a step)")
    with clear_errors():  # every training image is decoded here, once
        trainset = data.TrainSet(train_items, model.clip.visual.input_resolution, seed=cfg["seed"],
                                 device=device if on_device else None)
    loader = torch.utils.data.DataLoader(
        trainset, batch_size=cfg["batch_size"],
        shuffle=True, drop_last=len(train_items) >= cfg["batch_size"],
        pin_memory=device.startswith("cuda") and not on_device,  # copied to the GPU without a sync
        generator=torch.Generator().manual_seed(cfg["seed"]))
    # APLe tunes its branches in sequence: stage I-a, stage I-b (each with KL to zero-shot CLIP),
    # then stage II jointly. CoOp and PMPO have one stage.
    stages = model.stages(cfg)
    restart = model.schedule_restarts(cfg)  # each stage its own warm-up and cosine (APLe's option)
    power = model.lr_shape(cfg)  # 1: cosine; 2: squared cosine (KgCoOp's published runs)
    warn_warmup_only_stages(stages, cfg, restart, log)
    if not any(epochs for _, epochs in stages):  # --epochs 0 (APLe: --stage_epochs 0 0 0)
        log(f"--epochs 0: nothing is trained; the checkpoint and results are the prompts as "
            f"initialised (--seed {cfg['seed']})")
    done = state["done"] if state else []  # [stage index, epoch] pairs finished in an earlier run
    for stage_index, (stage, epochs) in enumerate(stages):
        model.set_stage(stage)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"],
                                    weight_decay=cfg["weight_decay"])
        if state and state["stage"] == stage_index:
            optimizer.load_state_dict(state["optimizer"])
        step = train_step(model, optimizer, cfg)  # eager, or replayed as a CUDA graph
        log(
            f"stage {stage!r}: {epochs} epochs, learning {sum(p.numel() for p in params):,} values"
            + (", the step replayed as a CUDA graph" if isinstance(step, GraphedStep) else "")
        )
        for epoch in range(epochs):
            if [stage_index, epoch] in done:
                continue
            if state:  # first epoch of a resumed run: the random streams go on where they stopped
                restore_rng(state, loader)
            lr = lr_at(*schedule_position(stages, stage_index, epoch, restart), cfg, power)
            for group in optimizer.param_groups:
                group["lr"] = lr
            start = time.time()
            where = f"stage {stage!r}, epoch {epoch + 1}"
            sums = LossSums(where, out, params)  # the loss and its terms, summed on the device
            progress = Progress(f"stage {stage} epoch {epoch + 1}/{epochs}", len(loader))
            for i, (images, labels) in enumerate(loader):
                # forward (the method's loss), backward and the SGD step; nothing read back
                losses = step(images.to(device, non_blocking=True),
                              labels.to(device, non_blocking=True))
                sums.add(losses)
                # the loss so far, read back only when a progress line is shown: a NaN stops the
                # run there, and a checkpoint below is never written from NaN prompts
                progress(i + 1, len(labels), note=lambda i=i: sums.read(i + 1))
            progress.close()
            state = None  # a resumed run's optimizer and random state are used once
            means = sums.read(len(loader))  # before the checkpoint: all finite, or stop
            model.on_epoch_end(epoch, epochs)  # e.g. PromptSRC's prompt averaging (GPA)
            done.append([stage_index, epoch])
            save_checkpoint(out, model, cfg, len(done))
            save_torch(os.path.join(out, "train_state.pt"), dict(
                done=done, stage=stage_index, optimizer=optimizer.state_dict(),
                rng=rng_state(loader),
                learned=learned_state(model, buffers=True)))  # buffers: PromptSRC's GPA sum
            seconds = time.time() - start
            left = sum(e for _, e in stages) - len(done)
            log(f"stage {stage} epoch {epoch + 1}/{epochs}  {means}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {seconds:.1f}s  "
                f"ETA {left * seconds / 60:.1f} min")
    return len(done)


def train_step(model, optimizer, cfg):
    """step(images, labels) -> {"loss": ..., each loss term: ...}, detached and left on the device:
    one SGD step on the method's loss. Replayed as a CUDA graph where --cuda_graphs allows."""
    scaler = torch.amp.GradScaler(enabled=cfg["precision"] == "fp16")  # scales only under fp16

    def step(images, labels):
        with autocast(cfg):
            loss = model.loss(images, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return {"loss": loss.detach(), **model.loss_terms}
    return GraphedStep(step, optimizer, cfg["cuda_graphs"] == "on") if graphs_on(cfg) else step


class LossSums:
    """The loss and its terms summed over an epoch's steps on the device, so no step waits for a
    read-back. read() reads them back, and whether the learned tensors are all finite, at once (one
    host sync), and stops the run on NaN or infinity, saying between which steps it happened."""

    def __init__(self, where, out, params):
        self.where, self.out, self.params = where, out, params
        self.sums, self.checked, self.text = {}, 0, None

    def add(self, losses):
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.text = None

    def read(self, steps):
        """"loss 0.9 (ce 0.9, kl 0.1)": the means over the `steps` steps added so far."""
        if self.text is not None:  # nothing added since the last read
            return self.text
        finite = [p.detach().isfinite().all() for p in self.params]
        values = torch.stack([*self.sums.values(), *finite]).tolist() if self.sums or finite else []
        sums = dict(zip(self.sums, values))
        bad = [k for k, v in sums.items() if not math.isfinite(v)]
        window = f"between steps {self.checked + 1} and {steps} of {self.where}"
        if bad:
            raise SystemExit(f"error: the loss became NaN or infinite {window} ({bad[0]} summed to "
                             f"{sums[bad[0]]}). Training stopped; "
                             f"{last_good(self.out)}. Try a lower --lr or --precision fp32.")
        if not all(values[len(sums):]):  # a finite loss can still give an infinite gradient
            raise SystemExit(f"error: a step {window} made the learned tensors NaN or infinite "
                             f"(the loss stayed finite). Training stopped; {last_good(self.out)}. "
                             f"Try a lower --lr or --precision fp32.")
        self.checked = steps
        means = {k: v / max(steps, 1) for k, v in sums.items()}
        terms = ", ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
        self.text = f"loss {means.get('loss', math.nan):.4f}" + (f" ({terms})" if terms else "")
        return self.text


@torch.no_grad()
def evaluate(model, items, cfg):
    """Top-1 accuracy (%) on items; the class features are computed once, then images stream by."""
    if not items:
        raise SystemExit("error: there are no test images to evaluate on")
    model.eval()
    device = cfg["device"]
    correct = total = 0
    n_px = model.clip.visual.input_resolution
    loader = data.test_loader(items, n_px, cfg["eval_batch_size"], cfg["workers"])
    progress = Progress(f"evaluating {len(items)} images", len(loader))
    with autocast(cfg), clear_errors():  # an unreadable test image: its name, not a traceback
        text_features = model.text_features()
        for step, (images, labels) in enumerate(loader):
            logits = model.logits(images.to(device, non_blocking=True), text_features)
            # counted on the device: no read-back per batch
            correct += (logits.argmax(-1) == labels.to(device, non_blocking=True)).sum()
            total += len(labels)
            progress(step + 1, len(labels))
    progress.close()
    return 100.0 * int(correct) / total  # the one read-back


def zeroshot_metrics(clip_model, ds, cfg):
    """Zero-shot CLIP on a data set's base and novel test images: base_acc, novel_acc, hm."""
    metrics = {}
    for subsample, key in (("base", "base_acc"), ("new", "novel_acc")):
        (_, _, test), classnames = data.subsample_classes(subsample, ds.train, ds.val, ds.test)
        model = zeroshot.CustomCLIP(clip_model, classnames, ds.template).to(cfg["device"])
        metrics[key] = evaluate(model, test, cfg)
    metrics["hm"] = harmonic_mean(metrics["base_acc"], metrics["novel_acc"])
    return metrics


def lr_at(epoch, epochs, cfg, power=1):
    """Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max=epochs), WARMUP_RECOUNT=True:
    warmup_lr for the warm-up epochs, then the cosine starts over, so the first epoch after warm-up
    trains at the full lr. epoch counts from 0. power (the method's model.lr_shape(cfg)) raises the
    cosine factor: 2 is two such schedulers stepping one optimiser, KgCoOp's published runs."""
    if epoch < cfg["warmup_epochs"]:
        return cfg["warmup_lr"]
    cosine = 0.5 * (1 + math.cos(math.pi * (epoch - cfg["warmup_epochs"]) / epochs))
    return cfg["lr"] * cosine ** power


def schedule_position(stages, stage_index, epoch, restart):
    """(epoch, epochs) of lr_at for `epoch` of stage `stage_index`. With several stages (APLe),
    either one warm-up and one cosine run over all of them, or each stage restarts its own
    (`restart`: the method's model.schedule_restarts(cfg)). With one stage the two are the same."""
    if restart:
        return epoch, stages[stage_index][1]
    return sum(e for _, e in stages[:stage_index]) + epoch, sum(e for _, e in stages)


def warn_warmup_only_stages(stages, cfg, restart, log):
    """A stage whose every epoch runs at warmup_lr learns next to nothing: say so."""
    fix = "one schedule over all stages" if restart else "fewer --warmup_epochs"
    for i, (stage, epochs) in enumerate(stages):
        last = schedule_position(stages, i, epochs - 1, restart)[0]  # its last epoch's place
        if epochs and last < cfg["warmup_epochs"]:
            log(f"warning: stage {stage!r} has no epoch after the warm-up: all its {epochs} "
                f"epoch(s) run at --warmup_lr {cfg['warmup_lr']:g} and learn next to nothing. "
                f"Give it more epochs, or {fix}.")


# -- what a run reads: the CLIP, the data set, the shots -------------------------------------------

def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_frozen_clip(name, device):
    with clear_errors():
        model, _ = clip.load(name, device=device)
    check_finite(model.state_dict(), f"the CLIP weights {name}")
    tokens = len(clip.tokenizer.default_tokenizer().encoder)  # ids the prompts' tokens can take
    if model.vocab_size < tokens:
        raise SystemExit(f"error: the CLIP {name} has {model.vocab_size} token embeddings, fewer "
                         f"than the tokenizer's {tokens} ids; it is not a CLIP of OpenAI's "
                         f"vocabulary (pass another --model)")
    return model.requires_grad_(False).eval()  # frozen by construction: CLIP gets no gradient


def build_method(method, clip_model, classnames, template, cfg):
    with clear_errors():  # settings that do not fit this CLIP (e.g. PMPO prompts > vision layers)
        return prompts.build(method, clip_model, classnames, template, cfg)


def read_dataset(name, root):
    with clear_errors():
        return data.build_dataset(name, root)


def few_shot_data(ds, cfg):
    """K-shot train and val lists over all classes: CoOp's draw for (split, K, seed), or
    --fewshot-file's."""
    path = cfg["fewshot_file"]
    if not ds.train:
        raise SystemExit(f"error: {cfg['dataset']} is test-only; train on another data set and "
                         f"use eval.py on it.")
    if not path:
        return data.fewshot_split(ds.train, ds.val, cfg["shots"], cfg["seed"])
    try:
        train, val = data.load_fewshot(path, ds.image_dir, ds.classnames)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --fewshot_file {path} is not a fewshot.json of "
                         f"train.py ({type(e).__name__}: {e})") from None
    if not train:
        raise SystemExit(f"error: --fewshot_file {path} lists no training images")
    shots = max(collections.Counter(item.label for item in train).values())  # the file decides K
    # e.g. CoOp's epochs, which follow K
    follow = prompts.protocol_defaults(cfg["method"], cfg["protocol"], cfg["dataset"], shots)
    cfg.update({k: v for k, v in follow.items() if k not in cfg["given"]},
               shots=shots, fewshot_file=os.path.abspath(path))
    return train, val


def warn_short_classes(train_items, shots, log):
    """CoOp keeps every image of a class smaller than K without a word; say so."""
    counts = collections.Counter(item.classname for item in train_items)
    short = {name: n for name, n in counts.items() if n < shots}
    if short:
        log(f"warning: {len(short)} classes have fewer than --shots {shots} training images and "
            f"use "
            f"all they "
            f"have: " + ", ".join(f"{name} ({n})" for name, n in list(short.items())[:10]))


if __name__ == "__main__":
    with interrupted():
        main(sys.argv[1:])
