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

import argparse
import glob
import json
import os
import statistics
import sys

import torch

import benchmark
import clip
import data
import options
import prompts
import runfolder
import speed
import train
from prompts import zeroshot
from prompts.common import learned_state


def parse_args(argv=None):
    argv = [options.flag_style(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
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
    p.add_argument("--benchmark", choices=benchmark.PROTOCOLS,
                   help="every run of a protocol's table (toy: zero-shot CLIP and every method "
                        "on the toy world), each into its train.py folder under --out (default "
                        "runs/, toy: runs/toy_benchmark), then the table; under torchrun shared "
                        "out over the processes. Flags after -- go to every train.py run")
    p.add_argument("--methods", nargs="+", choices=list(prompts.METHODS),
                   default=list(prompts.METHODS), help="of --benchmark (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(benchmark.SEEDS),
                   help="of --benchmark (default: 1 2 3)")
    p.add_argument("--datasets", nargs="+", help="of --benchmark (default: the protocol's 11; "
                   "crossdataset: the 10 targets and ImageNet's 4 shifts)")
    p.add_argument("--shots", nargs="+", type=int, default=list(benchmark.SHOTS),
                   help="of --benchmark fewshot (default: 1 2 4 8 16)")
    argv, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv,
                                                                                               [])
    args = p.parse_args(argv)
    args.train_args = extra
    if extra and not args.benchmark:
        p.error("flags after -- are for the runs of --benchmark")
    if args.benchmark:
        args.datasets = args.datasets or list(benchmark.default_datasets(args.benchmark))
        benchmark.check_datasets(args.datasets)
        if min(args.seeds + args.shots) < 1:
            p.error("--seeds and --shots must be at least 1")
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
    """A train.py checkpoint, read and checked by runfolder.read_checkpoint (the one reader of
    prompt_learner.pt; its fit to the method's model, which needs a CLIP, is checked in
    build_from_checkpoint)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path} (train.py writes "
                         f"<run folder>/prompt_learner.pt)")
    ckpt = runfolder.read_checkpoint(path)
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
    wanted = learned_state(model)  # a method's buffers are rebuilt or training-only
    saved = ckpt["state_dict"]
    missing = [k for k in wanted if k not in saved]
    unexpected = [k for k in saved if k not in wanted]
    shapes = [f"{k} {tuple(saved[k].shape)} {saved[k].dtype}, not {tuple(wanted[k].shape)}"
              for k in wanted if k in saved and (saved[k].shape != wanted[k].shape
                                                 or not saved[k].is_floating_point())]
    if missing or unexpected or shapes:
        raise SystemExit(f"error: {path} does not fit {cfg['method']} with its saved settings "
                         f"(missing {missing}, unexpected {unexpected}, shapes {shapes})")
    model.load_state_dict(saved, strict=False)
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
    with runfolder.write_errors(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    staged = os.path.join(os.path.dirname(os.path.abspath(path)),
                          f".{os.path.basename(path)}.{os.getpid()}.tmp")
    runfolder.save_json(staged, result)
    try:
        with runfolder.write_errors(path):
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
        print(summary(args.summary))
        return None
    if args.benchmark:
        return benchmark.run(args, args.train_args)
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
    clip_model = speed.keep_in_precision(train.load_frozen_clip(model_name, args.device), vars(args))
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

# may differ within a row: they change no result (threads, cuda_graphs: to float rounding)
NOT_SETTINGS = ("seed", "fewshot_file", "dataset", *runfolder.SPEED_KEYS)


def summary(dirs):
    """Markdown tables of every finished run under dirs: mean ± std over seeds, per data set.

    Runs share a table only if every setting but the seed (and the shots' file, the device and the
    worker count) is the same; tables that differ say in what. A seed found twice with the same
    settings counts once, and a note below the tables names both folders. Base-to-novel: HM per data
    set from its seed-averaged base and novel; the "Average" row's HM from the averaged base and
    novel, as in the CoCoOp/MaPLe tables. Cross-dataset adds each eval_*.json beside a run. A
    damaged file is named and skipped.
    """
    tables, notes = {}, []  # settings (JSON) -> dataset -> column -> [value per seed]
    seen, repeats = {}, []  # (settings, dataset, seed) -> (folder, metrics) of its first run
    for metrics_path in sorted(p for d in dirs for p in glob.glob(os.path.join(d, "**",
                                                                               "metrics.json"),
                                                                               recursive=True)):
        folder = os.path.dirname(metrics_path)
        cfg, why = read_run_config(os.path.join(folder, "config.json"))
        values, why = (None, why) if why else read_metrics(metrics_path, cfg["protocol"])
        if why:
            notes.append(f"skipped {folder}: {why}")
            continue
        for path in sorted(glob.glob(os.path.join(folder, "eval_*.json"))):
            e, why = read_eval(path)
            if why:
                notes.append(f"skipped {path}: {why}")
                continue
            values[f"{e['dataset']} ({e['subsample']})"] = e["accuracy"]
        settings = json.dumps({k: v for k, v in cfg.items() if k not in NOT_SETTINGS},
                              sort_keys=True)
        key = (settings, cfg["dataset"], cfg["seed"])
        if key in seen:  # e.g. the quick start's run and the benchmark's: one seed, counted once
            repeats.append((key, seen[key], (folder, values)))
            continue
        seen[key] = (folder, values)
        row = tables.setdefault(settings, {}).setdefault(cfg["dataset"], {})
        row.setdefault("seed", []).append(cfg["seed"])
        for column, value in values.items():
            row.setdefault(column, []).append(value)
    for (settings, dataset, seed), (first, kept), (again, other) in repeats:
        same = "the same results" if kept == other else f"other results, {other}, not counted"
        notes.append(f"note: {dataset} in \"{title(settings, tables)}\": seed {seed} is in {first} "
                     f"and again, with the same settings, in {again} ({same}); counted once")
    if not tables:
        return "\n".join(notes + [f"no finished runs (metrics.json) under {', '.join(dirs)}"])
    blocks = [markdown_table(title(k, tables), json.loads(k)["protocol"],
                             t) for k, t in tables.items()]
    return "\n\n".join(blocks + side_by_side(tables) + notes)


def side_by_side(tables):
    """Base-to-novel: one more table with a row per table above (a method and its settings),
    as the papers' tables compare methods: seed mean ± std on a single data set, else the
    average over the data sets."""
    groups = {}  # (shots, data sets) -> [settings key]
    for key, table in tables.items():
        cfg = json.loads(key)
        if cfg["protocol"] == "base2novel":
            groups.setdefault((cfg["shots"], tuple(sorted(table))), []).append(key)
    blocks = []
    for (shots, datasets), keys in groups.items():
        if len(keys) < 2:
            continue
        order = ["zeroshot", *prompts.METHODS]  # the papers' row order: zero-shot CLIP first
        keys.sort(
            key=lambda k: order.index(m) if (m := json.loads(k)["method"]) in order else len(order)
        )
        where = datasets[0] if len(datasets) == 1 else f"average over {len(datasets)} data sets"
        lines = [f"### base-to-novel, {shots} shots, {where}: side by side", "",
                 "| method | seeds | base_acc | novel_acc | HM |", "|---|---|---|---|---|"]
        for key in keys:
            rows = tables[key].values()
            base = [statistics.mean(row["base_acc"]) for row in rows]
            novel = [statistics.mean(row["novel_acc"]) for row in rows]
            if len(datasets) == 1:
                row = next(iter(rows))
                cells = [fmt(row["base_acc"]), fmt(row["novel_acc"])]
            else:
                cells = [f"{statistics.mean(base):.2f}", f"{statistics.mean(novel):.2f}"]
            hm = train.harmonic_mean(statistics.mean(base), statistics.mean(novel))
            seeds = "/".join(str(len(row["seed"])) for row in rows)
            lines.append(f"| {title(key, tables).split(',')[0]}{settings_note(key, tables)} | "
                         f"{seeds} | "
                         + " | ".join(cells) + f" | {hm:.2f} |")
        blocks.append("\n".join(lines))
    return blocks


def settings_note(key, tables):
    """What follows the method in a table's title ("coop, base2novel, 16 shots, lr
    0.001" -> ", lr 0.001")."""
    parts = title(key, tables).split(", ")
    return "".join(", " + p for p in parts[3:])


def fmt(values):
    """Seed values -> "mean ± std" (a single seed: its value)."""
    return (
        f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
        if len(values) > 1
        else f"{values[0]:.2f}"
    )


def title(settings, tables):
    """"method, protocol, K shots", and the settings in which the table
    differs from others so named."""
    cfg = json.loads(settings)
    name = (cfg["method"], cfg["protocol"], cfg["shots"])
    others = [json.loads(k) for k in tables if k != settings]
    others = [o for o in others if (o["method"], o["protocol"], o["shots"]) == name]
    differ = sorted({k for o in others for k in set(o) | set(cfg) if o.get(k) != cfg.get(k)})
    return f"{cfg['method']}, {cfg['protocol']}, {cfg['shots']} shots" + "".join(
        f", {k} {cfg.get(k)!r}" for k in differ)


def markdown_table(name, protocol, table):
    """One table: a row per data set (mean ± std over seeds) and their average. Base-to-novel
    adds HM; cross-dataset has a column per target (eval_<target>_all.json) and their
    average, as the papers."""
    columns = list(dict.fromkeys(c for row in table.values() for c in row if c not in ("hm",
                                                                                       "seed")))
    targets = [c for c in columns if c.endswith(" (all)")] if protocol == "crossdataset" else []
    for row in table.values():  # per seed: the mean over the targets this run was evaluated on
        if targets and all(len(row.get(t, [])) == len(row["seed"]) for t in targets):
            row["target average"] = [statistics.mean(v) for v in zip(*(row[t] for t in targets))]
    if any("target average" in row for row in table.values()):
        columns.append("target average")
    lines = [
        f"### {name}",
        "",
        "| data set | seeds | "
        + " | ".join(columns)
        + (" | HM |" if protocol == "base2novel" else " |"),
        "|---" * (len(columns) + 2 + (protocol == "base2novel")) + "|",
    ]
    means = {c: [] for c in columns}
    for dataset, row in table.items():
        cells = [fmt(row[c]) if c in row else "" for c in columns]
        for c in columns:
            if c in row:
                means[c].append(statistics.mean(row[c]))
        if protocol == "base2novel":
            hm = train.harmonic_mean(statistics.mean(row["base_acc"]),
                                     statistics.mean(row["novel_acc"]))
            cells.append(f"{hm:.2f}")
        lines.append(f"| {dataset} | {len(row['seed'])} | " + " | ".join(cells) + " |")
    if len(table) > 1:
        cells = [f"{statistics.mean(means[c]):.2f}" if means[c] else "" for c in columns]
        if protocol == "base2novel":
            hm = train.harmonic_mean(statistics.mean(means["base_acc"]),
                                     statistics.mean(means["novel_acc"]))
            cells.append(f"{hm:.2f}")
        lines.append("| **Average** | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the files --summary reads: one reader per kind, each (value, None) or (None, what is wrong) ---

def read_run_config(path):
    """A run's config.json: the settings a table is grouped by."""
    cfg = runfolder.read_json(path)
    if not isinstance(cfg, dict):
        return None, f"{path} is missing or damaged (not a JSON object)"
    for key, kind in dict(method=str, protocol=str, dataset=str, shots=int, seed=int).items():
        if not isinstance(cfg.get(key), kind) or isinstance(cfg.get(key), bool):
            return None, f"{path}: {key} is {cfg.get(key)!r}, not a {kind.__name__}"
    if cfg["shots"] < 1 or cfg["seed"] < 0:
        return None, f"{path}: shots {cfg['shots']} or seed {cfg['seed']} is out of range"
    if cfg["protocol"] not in options.PROTOCOLS:
        return None, f"{path}: protocol {cfg['protocol']!r} is not one of {options.PROTOCOLS}"
    return cfg, None


def read_metrics(path, protocol):
    """A run's metrics.json: every value an accuracy, with the protocol's columns."""
    values = runfolder.read_json(path)
    if not isinstance(values, dict):
        return None, f"{path} is damaged (not a JSON object)"
    columns = ("base_acc", "novel_acc") if protocol == "base2novel" else ("accuracy",)
    missing = [c for c in columns if c not in values]
    if missing:
        return None, f"{path} has no {', '.join(missing)}"
    for key, value in values.items():
        if not is_accuracy(value):
            return None, f"{path}: {key} is {value!r}, not an accuracy (a number in [0, 100])"
    return values, None


def read_eval(path):
    """An eval_*.json beside a run (eval.py's result)."""
    e = runfolder.read_json(path)
    if not isinstance(e, dict):
        return None, "damaged (not a JSON object)"
    if e.get("unfinished"):
        return None, f"evaluated from an unfinished run (epoch {e.get('epoch')})"
    if not isinstance(e.get("dataset"), str) or e.get("subsample") not in ("all", "base", "new"):
        return None, f"dataset {e.get('dataset')!r} / subsample {e.get('subsample')!r} are not " \
                     f"eval.py's"
    if not is_accuracy(e.get("accuracy")):
        return None, f"accuracy is {e.get('accuracy')!r}, not a number in [0, 100]"
    return e, None


def is_accuracy(value):
    """A percentage: a real number in [0, 100] (not true/false, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 100


if __name__ == "__main__":
    with runfolder.interrupted():
        main(sys.argv[1:])
