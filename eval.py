"""Evaluate learned prompts, or zero-shot CLIP, on any data set and split; summarise
runs as the papers' tables.

    python eval.py --method zeroshot --dataset caltech101 --subsample new
    python eval.py --ckpt runs/caltech101/pmpo/base2novel/shots16_seed1/prompt_learner.pt \
        --dataset caltech101 --subsample new
    python eval.py --ckpt runs/imagenet/pmpo/crossdataset/shots16_seed1/prompt_learner.pt \
        --dataset imagenet_a
    python eval.py --summary runs/
    python eval.py --benchmark toy   # zero-shot and every method on the toy world, seeds 1-3
    torchrun --nproc_per_node 8 eval.py --benchmark base2novel   # a paper's table, over 8 GPUs

Prompts are class-agnostic, so a checkpoint evaluates on any class list: the novel half of
its data set, another data set (cross-dataset), an ImageNet shift (domain generalisation).
Results are printed and saved as JSON (next to the checkpoint by default); an existing
result is never overwritten.
"""

import json
import os
import sys

import torch

import checkpoint
import clip
import console
import data
import options
import prompts
import reproduce
import runfolder
import speed
import tables
import train
from prompts import zeroshot
from checkpoint import expected_state


def parse_args(argv=None):
    argv = [options.flag_style(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    p = options.Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Flags take - or _ alike "
                                       "(--eval-batch-size = --eval_batch_size).")
    p.add_argument("--ckpt", help="a prompt_learner.pt written by train.py")
    p.add_argument("--method", help="'zeroshot' (no --ckpt), or the checkpoint's method as a check")
    p.add_argument("--dataset", help=f"one of {', '.join(data.DATASETS)}, or folder:/path")
    p.add_argument("--subsample", default="all", choices=("all", "base", "new"),
                   help="classes to test on")
    p.add_argument("--root", default=os.environ.get("DATA", "data_root"),
                   help="data sets folder ($DATA)")
    p.add_argument("--model", help="CLIP name or path (default: the checkpoint's, else ViT-B/16)")
    p.add_argument("--out", help="result JSON (default: next to the checkpoint, or runs/zeroshot/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, mps")
    shared = {k: options.DEFAULTS[k] for k in ("precision", "eval_batch_size", "workers")}
    options.add_options(p, shared, options.HELP, options.CHOICES)
    p.add_argument("--allow_unfinished", action="store_true",
                   help="evaluate a checkpoint of a run that has not finished (its result is "
                        "marked unfinished; --summary leaves it out)")
    p.add_argument("--summary", nargs="+", metavar="DIR",
                   help="print the Markdown tables of the runs under DIR")
    p.add_argument("--benchmark", choices=reproduce.BENCHMARKS,
                   help="every run of a protocol's table (toy: zero-shot CLIP and every method "
                        "on the toy world), each into its train.py folder under --out (default "
                        "runs/, toy: runs/toy_benchmark), then the table; under torchrun shared "
                        "out over the processes. Flags after -- go to every train.py run")
    p.add_argument("--methods", nargs="+", choices=list(prompts.METHODS),
                   default=list(prompts.METHODS), help="of --benchmark (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(reproduce.SEEDS),
                   help="of --benchmark (default: 1 2 3)")
    p.add_argument("--datasets", nargs="+", help="of --benchmark (default: the protocol's 11; "
                   "crossdataset: the 10 targets and ImageNet's 4 shifts)")
    p.add_argument("--shots", nargs="+", type=int,
                   help="K of --benchmark's runs (default: fewshot 1 2 4 8 16, else 16)")
    argv, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv,
                                                                                               [])
    args = p.parse_args(argv)
    args.train_args = extra
    if extra and not args.benchmark:
        p.error("flags after -- are for the runs of --benchmark")
    for flag in (a[2:].partition("=")[0] for a in extra if a.startswith("--")):
        if flag in reproduce.OWNED:  # the benchmark sets it in every run
            own = reproduce.OWNED[flag]
            p.error(f"--{flag} after -- is the benchmark's to set in each run"
                    + (f"; use eval.py's {own}" if own else "") + ", before --")
    if args.benchmark:
        args.datasets = args.datasets or list(reproduce.default_datasets(args.benchmark))
        args.shots = args.shots or list(reproduce.SHOTS if args.benchmark == "fewshot" else [16])
        reproduce.check_datasets(args.datasets)
        for flag, key in (("seeds", "seed"), ("shots", "shots")):  # each run's own bounds
            bad = [v for v in getattr(args, flag) if v < 1 or v not in options.CHOICES[key]]
            if bad:
                p.error(f"--{flag} must be at least 1 and within --{key}'s bounds, "
                        f"{options.CHOICES[key]} (got {bad[0]})")
    defaults = options.shared_defaults(args.dataset or args.benchmark)  # the toy world's differ
    vars(args).update({k: defaults[k] for k in shared if getattr(args, k) is None})  # not given
    if not args.summary and not args.benchmark:
        if not args.dataset:
            p.error("--dataset is required")
        if not args.ckpt and args.method != "zeroshot":
            p.error("give --ckpt PATH (prompts from train.py) or --method zeroshot")
    options.check_values(p, vars(args), shared, options.CHOICES)
    options.check_device(p, vars(args))  # vars: the same dict, so precision auto resolves in args
    return args


def load_checkpoint(path, method=None):
    """A train.py checkpoint, read and checked by checkpoint.read_checkpoint (the one reader of
    prompt_learner.pt; its fit to the method's model, which needs a CLIP, is checked in
    build_from_checkpoint)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path} (train.py writes "
                         f"<run folder>/prompt_learner.pt)")
    ckpt = checkpoint.read_checkpoint(path)
    if method and method != ckpt["method"]:
        raise SystemExit(f"error: {path} holds {ckpt['method']} prompts, not {method}")
    return ckpt


def build_from_checkpoint(ckpt, path, clip_model, dataset, subsample, classnames, template):
    """The checkpoint's method on this class list, with its learned tensors loaded and checked."""
    cfg = ckpt["config"]
    if ckpt["clip_architecture"] != prompts.clip_architecture(clip_model):
        raise SystemExit(f"error: the prompts in {path} were learned on another CLIP "
                         f"({cfg['model']}: {ckpt['clip_architecture']}); pass --model "
                         f"{cfg['model']}")
    trained_on = "base" if cfg["protocol"] == "base2novel" else "all"
    if dataset == cfg["dataset"] and subsample == trained_on and classnames != ckpt["classnames"]:
        raise SystemExit(f"error: {dataset}'s {subsample} classes here differ from the "
                         f"{len(ckpt['classnames'])} the prompts in {path} were trained on "
                         f"(another split file or data set version?)")
    model = train.build_method(cfg["method"], clip_model, classnames, template, cfg)
    # a method's buffers are rebuilt or training-only: only its parameters are saved
    checkpoint.check_fit(path, ckpt["state_dict"], expected_state(model, cfg)["prompt_learner"])
    model.load_state_dict(ckpt["state_dict"], strict=False)
    return model


def check_finished(path, allow):
    """A checkpoint of a run that has not finished (killed, or still training) holds an epoch's
    prompts, not the run's: refused, unless allowed (its result is then marked unfinished)."""
    folder = os.path.dirname(os.path.abspath(path))
    if runfolder.finished(folder):
        return False
    if not allow:
        raise SystemExit(f"error: {path} is from a run that has not finished ({folder} has no "
                         f"metrics.json: it was stopped, or is still training), so its prompts "
                         f"are not the run's final ones. Finish the run (the same train.py "
                         f"command resumes it), or pass --allow-unfinished to evaluate it anyway "
                         f"(the result is marked unfinished, and --summary leaves it out)")
    print(f"warning: {path} is from an unfinished run; its result is marked unfinished")
    return True


def result_path(args, ckpt, model_name):
    """--out, or the default name; checked before anything is evaluated."""
    name = f"{runfolder.safe_name(args.dataset)}_{args.subsample}.json"
    default = (os.path.join(os.path.dirname(args.ckpt), "eval_" + name) if ckpt
               else os.path.join("runs", "zeroshot", runfolder.safe_name(model_name), name))
    out = args.out or default
    if os.path.isdir(out) or out.endswith(("/", os.sep)):  # the result's file, not its folder
        raise SystemExit(f"error: --out {out} exists as a folder (or ends in /); --out names "
                         f"the result's file, e.g. {os.path.join(out, os.path.basename(default))}")
    if os.path.exists(out):
        raise SystemExit(f"error: {out} exists; pass another --out or delete it to evaluate again")
    if runfolder.unwritable(out):
        raise SystemExit(f"error: --out {out} cannot be written: {runfolder.unwritable(out)}")
    return out


def save_result(path, result):
    """Write a result next to no other: atomically under a private name, then hard-linked to
    path, which fails if the name exists (another eval.py with the same --out finished first)."""
    with console.write_errors(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    staged = os.path.join(os.path.dirname(os.path.abspath(path)),
                          f".{os.path.basename(path)}.{os.getpid()}.tmp")
    runfolder.save_json(staged, result)
    try:
        with console.write_errors(path):
            os.link(staged, path)
    except SystemExit:
        if os.path.exists(path):
            raise SystemExit(f"error: {path} was written by another process while this one "
                             f"evaluated; it is kept. Pass another --out to save this result") \
                from None
        raise
    finally:
        os.remove(staged)


def main(argv=None):
    args = parse_args(argv)
    if args.summary:
        print(tables.summary(args.summary))
        return None
    if args.benchmark:
        return reproduce.run(args, args.train_args, evaluate=main)  # main: its evaluations
    ckpt = load_checkpoint(args.ckpt, args.method) if args.ckpt else None
    unfinished = check_finished(args.ckpt, args.allow_unfinished) if ckpt else False
    model_name = args.model or (
        ckpt["config"]["model"] if ckpt else options.shared_defaults(args.dataset)["model"]
    )
    out = result_path(args, ckpt, model_name)

    ds = train.read_dataset(args.dataset, args.root)
    (_, _, test), classnames = data.subsample_classes(args.subsample, ds.train, ds.val, ds.test)
    if not test:
        raise SystemExit(f"error: {args.dataset} has no test images for "
                         f"its {args.subsample} classes")
    for names in data.duplicate_classnames(test):
        print(f"warning: CLIP cannot tell these classes apart, their prompts are the same: "
              f"{', '.join(names)}")
    clip_model = train.load_frozen_clip(model_name, args.device)
    clip_model = speed.keep_in_precision(clip_model, vars(args))
    clip_sha256 = clip.clip.sha256(model_name)
    trained_on = ckpt["config"].get("clip_sha256") if ckpt else None  # older runs: not recorded
    if trained_on and trained_on != clip_sha256:  # same architecture, other weights
        raise SystemExit(f"error: the prompts in {args.ckpt} were learned on another CLIP file "
                         f"(sha256 {trained_on}; {model_name} is {clip_sha256}); pass --model "
                         f"with the CLIP they were trained on")
    if ckpt:
        model = build_from_checkpoint(ckpt, args.ckpt, clip_model, args.dataset, args.subsample,
                                      classnames, ds.template)
    else:
        model = zeroshot.CustomCLIP(clip_model, classnames, ds.template).to(args.device)
    result = dict(method=ckpt["method"] if ckpt else "zeroshot", checkpoint=args.ckpt,
                  model=model_name, dataset=args.dataset, subsample=args.subsample,
                  clip_sha256=clip_sha256, precision=args.precision,
                  classes=len(classnames), images=len(test),
                  accuracy=train.evaluate(model, test, vars(args)))
    if unfinished:  # --summary leaves it out
        result.update(unfinished=True, epoch=ckpt["epoch"])
    print(json.dumps(result, indent=2))
    save_result(out, result)
    return result


# -- the papers' tables ----------------------------------------------------------------------------


# -- the files --summary reads: one reader per kind, each (value, None) or (None, what is wrong) ---


if __name__ == "__main__":
    with console.interrupted():
        main(sys.argv[1:])
