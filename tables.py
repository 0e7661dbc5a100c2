"""The papers' tables from run folders, as the papers print them: a table per method, protocol and
K, a row per data set (mean ± std over seeds) and the Average row, the side-by-side table of
methods, and the published number beside ours (data/published.csv). eval.py --summary and
--benchmark print them.

A table is split only by what the user changed (a flag); what the protocol sets per data set
(CoOp's 50 epochs on ImageNet, PromptSRC's GPA per data set) is the protocol, noted under the
table. Base-to-novel: HM per data set from its seed-averaged base and novel; the Average row's HM
from the averaged base and novel (CoCoOp, MaPLe). Cross-dataset prints two tables as the papers
do: transfer to the 10 other data sets (CoCoOp Table 2, MaPLe Table 3) and domain generalisation
to ImageNet's 4 shifts (CoCoOp Table 3, MaPLe Table 4), each with its own average. Missing runs
are named under their table, against the grid the benchmark asked for or, for --summary, the
data sets and seeds found. A damaged file is named and skipped.
"""
import glob
import json
import os
import statistics

import options
import prompts
from data.published import paper_number
from runfolder import read_config, read_json

# The protocol's data sets (CoOp, CoCoOp, MaPLe): base-to-novel and few-shot on 11; cross-dataset
# trains on ImageNet and evaluates on the other 10, then on ImageNet's 4 shifts.
ELEVEN = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
          "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
SHIFTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
# what never splits a table: the rows (data set), the seeds, and what changes no result
NOT_SETTINGS = ("seed", "dataset", "fewshot_file", "clip_sha256", *options.FREE_KEYS,
                *options.PLACES)


def summary(dirs, grid=None):
    """Markdown tables of every finished run under dirs. grid: what --benchmark asked for
    (methods, datasets, seeds), so that a run missing from it is named; else the data sets and
    seeds found in a table are its grid."""
    tables, notes = {}, []  # table key (JSON) -> dataset -> column -> [value per seed]
    seen, repeats = {}, []  # (key, dataset, seed) -> (folder, metrics) of its first run
    paths = sorted(p for d in dirs for p in glob.glob(os.path.join(d, "**", "metrics.json"),
                                                      recursive=True))
    for metrics_path in paths:
        folder = os.path.dirname(metrics_path)
        cfg, values, why = read_run(folder, metrics_path)
        if why:
            notes.append(f"skipped {folder}: {why}")
            continue
        for path in sorted(glob.glob(os.path.join(folder, "eval_*.json"))):
            e, why = read_eval(path)
            if why:
                notes.append(f"skipped {path}: {why}")
                continue
            values[f"{e['dataset']} ({e['subsample']})"] = e["accuracy"]
        key = json.dumps(dict(method=cfg["method"], protocol=cfg["protocol"], shots=cfg["shots"],
                              **changes(cfg)), sort_keys=True)
        if (key, cfg["dataset"], cfg["seed"]) in seen:  # e.g. the quick start's and the benchmark's
            repeats.append((key, cfg, seen[key, cfg["dataset"], cfg["seed"]], (folder, values)))
            continue
        seen[key, cfg["dataset"], cfg["seed"]] = (folder, values)
        row = tables.setdefault(key, {}).setdefault(cfg["dataset"], {})
        row.setdefault("seed", []).append(cfg["seed"])
        for column, value in values.items():
            row.setdefault(column, []).append(value)
    for key, cfg, (first, kept), (again, other) in repeats:
        same = "the same results" if kept == other else f"other results, {other}, not counted"
        notes.append(f"note: {cfg['dataset']} in \"{title(key)}\": seed {cfg['seed']} is in "
                     f"{first} and again, with the same settings, in {again} ({same}); counted "
                     f"once")
    if grid:
        found = {json.loads(k)["method"] for k in tables}
        notes += [f"missing: {m}: no finished run" for m in grid["methods"] if m not in found]
    if not tables:
        return "\n".join(notes + [f"no finished runs (metrics.json) under {', '.join(dirs)}"])
    blocks = [block for key, table in tables.items() for block in markdown_tables(key, table, grid)]
    return "\n\n".join(blocks + side_by_side(tables) + notes)


def read_run(folder, metrics_path):
    """(config, metrics, None), or (None, None, what is wrong)."""
    try:
        cfg = read_config(os.path.join(folder, "config.json"))
    except ValueError as e:
        return None, None, str(e)
    if cfg is None:
        return None, None, f"{folder}/config.json is missing or damaged"
    values, why = read_metrics(metrics_path, cfg["protocol"])
    return (None, None, why) if why else (cfg, values, None)


def protocol_settings(method, dataset, protocol, shots):
    """What the protocol sets for a run: train.py's settings with no flag but these."""
    if method not in prompts.METHODS:  # zero-shot CLIP: nothing to set
        return {}
    return options.settings(method, dataset, dict(protocol=protocol, shots=shots))


def changes(cfg):
    """The settings of a run that its protocol does not set: what the user changed."""
    ref = protocol_settings(cfg["method"], cfg["dataset"], cfg["protocol"], cfg["shots"])
    ref = {k: list(v) if isinstance(v, tuple) else v for k, v in ref.items()}  # as JSON keeps it
    if ref.get("precision") == "auto":  # what auto became on the run's device
        ref["precision"] = options.default_precision(cfg.get("device", "cpu"))
    return {k: new for k, (_, new) in options.differences(ref, cfg).items()
            if k not in NOT_SETTINGS}


def paper_order(dataset):
    """The papers' order of data sets (their rows and columns); others after them, by name."""
    order = [*ELEVEN, *SHIFTS]
    return (order.index(dataset) if dataset in order else len(order), dataset)


def title(key):
    """"method, protocol, K shots", then each setting the user changed."""
    cfg = json.loads(key)
    return f"{cfg.pop('method')}, {cfg.pop('protocol')}, {cfg.pop('shots')} shots" + "".join(
        f", {k} {v!r}" for k, v in sorted(cfg.items()))


def markdown_tables(key, table, grid):
    """The table(s) of one key: cross-dataset's two, else one; each with its missing runs."""
    cfg = json.loads(key)
    if grid and cfg["method"] == "zeroshot":  # no seed changes zero-shot CLIP: seed 1 is its row
        grid = dict(grid, seeds=[1])
    datasets = list(grid["datasets"]) if grid else sorted(table, key=paper_order)
    if cfg["protocol"] == "crossdataset":  # its targets: eval.py's results on all classes
        table = {d: {c.removesuffix(" (all)"): v for c, v in row.items()
                     if not c.endswith((" (base)", " (new)"))} for d, row in table.items()}
        targets = sorted({c for row in table.values() for c in row
                          if c not in ("accuracy", "seed")}, key=paper_order)
        shifts = [t for t in targets if t in SHIFTS]
        wanted = [t for t in (grid or {}).get("datasets", targets)]
        parts = [("cross-dataset transfer", [t for t in targets if t not in SHIFTS],
                  [t for t in wanted if t not in SHIFTS], "crossdataset"),
                 ("domain generalisation", shifts, [t for t in wanted if t in SHIFTS],
                  "domaingen")]
        return [text for name, columns, want, paper in parts if columns or want
                for text in [target_table(f"{title(key)}: {name}", table, columns, want, paper,
                                          cfg, grid)]]
    return [row_table(title(key), table, datasets, cfg, grid)]


def row_table(name, table, datasets, cfg, grid):
    """Base-to-novel or few-shot: a row per data set and the Average; the paper's number and our
    difference beside the HM (or the accuracy) where the run has the paper's settings."""
    b2n = cfg["protocol"] == "base2novel"
    columns = ["base_acc", "novel_acc"] if b2n else ["accuracy"]
    head = "HM" if b2n else "accuracy"
    paper = {d: published(cfg, d, "hm" if b2n else "accuracy") for d in table}
    # the papers' average is over their 11 data sets: beside ours only when ours is too
    paper["average"] = published(cfg, "average", "hm" if b2n else "accuracy") if set(
        table) == set(ELEVEN) else None
    with_paper = any(v is not None for v in paper.values())
    lines = [f"### {name}", "", "| data set | seeds | " + " | ".join(columns)
             + (" | HM" if b2n else "") + (f" | paper {head} | Δ" if with_paper else "") + " |",
             "|---" * (len(columns) + 2 + b2n + 2 * with_paper) + "|"]
    means = {c: [] for c in columns}
    for dataset in [d for d in datasets if d in table] + [d for d in table if d not in datasets]:
        row = table[dataset]
        mean = {c: statistics.mean(row[c]) for c in columns}
        for c in columns:
            means[c].append(mean[c])
        ours = harmonic_mean(mean["base_acc"], mean["novel_acc"]) if b2n else mean["accuracy"]
        cells = [fmt(row[c]) for c in columns] + ([f"{ours:.2f}"] if b2n else [])
        lines.append(f"| {dataset} | {len(row['seed'])} | " + " | ".join(
            cells + (beside(ours, paper[dataset]) if with_paper else [])) + " |")
    expected = list(dict.fromkeys([*(grid or {}).get("datasets", []), *table]))
    if len(table) > 1 or len(expected) > len(table):
        mean = {c: statistics.mean(means[c]) for c in columns}
        ours = harmonic_mean(mean["base_acc"], mean["novel_acc"]) if b2n else mean["accuracy"]
        cells = [f"{mean[c]:.2f}" for c in columns] + ([f"{ours:.2f}"] if b2n else [])
        label = ("**Average**" if len(table) == len(expected)
                 else f"**Average** ({len(table)} of {len(expected)} data sets)")
        lines.append(f"| {label} | | " + " | ".join(
            cells + (beside(ours, paper["average"]) if with_paper else []))
            + " |")
    return "\n".join(lines + holes(table, expected, grid) + per_dataset(cfg, table))


def target_table(name, table, columns, wanted, paper_protocol, cfg, grid):
    """Cross-dataset: the ImageNet row(s), a column per target and their average, then the
    paper's row and our difference where the paper gives the numbers."""
    columns = [t for t in wanted if t in columns] + [t for t in columns if t not in wanted]
    head = ["accuracy", *columns]
    lines = [f"### {name}", "", "| trained on | seeds | imagenet | "
             + "".join(f"{t} (all) | " for t in columns) + "average |",
             "|---" * (len(columns) + 4) + "|"]
    for dataset, row in table.items():
        complete = [t for t in columns if len(row.get(t, [])) == len(row["seed"])]
        per_seed = [statistics.mean(v) for v in zip(*(row[t] for t in complete))]
        cells = [fmt(row[c]) if c in row else "" for c in head]
        average = f"{statistics.mean(per_seed):.2f}" if per_seed and complete == columns else ""
        lines.append(f"| {dataset} | {len(row['seed'])} | " + " | ".join(cells + [average]) + " |")
        ours = [statistics.mean(row[c]) if c in row else None for c in head]
        ours.append(statistics.mean(per_seed) if average else None)
    paper = [published(dict(cfg, protocol=paper_protocol), "imagenet" if c == "accuracy" else c,
                       "accuracy") for c in head]
    whole = set(columns) == set(SHIFTS if paper_protocol == "domaingen" else ELEVEN[1:])
    # the paper's average is over all its targets: beside ours only when ours is too
    paper.append(published(dict(cfg, protocol=paper_protocol), "average", "accuracy")
                 if whole else None)
    if any(v is not None for v in paper) and len(table) == 1:
        lines.append("| paper | | " + " | ".join("" if v is None else f"{v:.2f}" for v in paper)
                     + " |")
        lines.append("| Δ | | " + " | ".join(
            "" if v is None or o is None else f"{o - v:+.2f}" for o, v in zip(ours, paper)) + " |")
    missing = [t for t in wanted if not any(t in row for row in table.values())]
    notes = [f"missing: {', '.join(missing)} (not evaluated)"] if missing else []
    return "\n".join(lines + notes + holes(table, ["imagenet"] if grid else list(table), grid))


def published(cfg, dataset, column):
    """The paper's number for this table's method, protocol and K on `dataset`, or None. It stands
    beside every table, settings changed or not: the title names what differs from the paper's."""
    number = paper_number(cfg["protocol"], cfg["method"], dataset, cfg["shots"], column)
    return number[0] if number else None


def beside(ours, paper):
    return ["", ""] if paper is None else [f"{paper:.2f}", f"{ours - paper:+.2f}"]


def holes(table, datasets, grid):
    """Lines naming each run of the grid this table lacks: a data set, or some of its seeds."""
    seeds = (grid or {}).get("seeds") or sorted({s for row in table.values() for s in row["seed"]})
    lines = []
    for dataset in datasets:
        have = table.get(dataset, {}).get("seed", [])
        lost = [str(s) for s in seeds if s not in have]
        if lost:
            lines.append(f"missing: {dataset} seed {', '.join(lost)}"
                         + ("" if have else " (no finished run)"))
    return lines


def per_dataset(cfg, table):
    """What the protocol sets for some data sets only (CoOp's ImageNet epochs, ...): one line."""
    if cfg["method"] not in prompts.METHODS:
        return []
    generic = protocol_settings(cfg["method"], "folder:", cfg["protocol"], cfg["shots"])
    said = []
    for dataset in table:
        own = protocol_settings(cfg["method"], dataset, cfg["protocol"], cfg["shots"])
        differ = [f"{k} {own[k]!r}" for k in own if own[k] != generic.get(k)
                  and k not in (*NOT_SETTINGS, "model")]
        if differ:
            said.append(f"{dataset}: {', '.join(differ)}")
    return [f"protocol settings per data set: {'; '.join(said)}"] if said else []


def side_by_side(tables):
    """Base-to-novel: a row per table above (a method and what the user changed), as the papers
    compare methods: seed mean ± std on a single data set, else the average over the data sets
    that every method has; the paper's HM beside it."""
    groups = {}  # (shots, data sets) -> [table key]
    for key, table in tables.items():
        cfg = json.loads(key)
        if cfg["protocol"] == "base2novel":
            groups.setdefault((cfg["shots"], tuple(sorted(table))), []).append(key)
    blocks = []
    order = ["zeroshot", *prompts.METHODS]  # the papers' row order: zero-shot CLIP first
    for (shots, datasets), keys in groups.items():
        if len(keys) < 2:
            continue
        keys.sort(key=lambda k: order.index(m) if (m := json.loads(k)["method"]) in order
                  else len(order))
        where = datasets[0] if len(datasets) == 1 else f"average over {len(datasets)} data sets"
        paper_at = datasets[0] if len(datasets) == 1 else (
            "average" if set(datasets) == set(ELEVEN) else None)
        papers = {k: published(json.loads(k), paper_at, "hm") if paper_at else None for k in keys}
        with_paper = any(v is not None for v in papers.values())
        lines = [f"### base-to-novel, {shots} shots, {where}: side by side", "",
                 "| method | seeds | base_acc | novel_acc | HM |" + (" paper HM |" * with_paper),
                 "|---|---|---|---|---|" + "---|" * with_paper]
        for key in keys:
            rows = tables[key].values()
            base = [statistics.mean(row["base_acc"]) for row in rows]
            novel = [statistics.mean(row["novel_acc"]) for row in rows]
            if len(datasets) == 1:
                row = next(iter(rows))
                cells = [fmt(row["base_acc"]), fmt(row["novel_acc"])]
            else:
                cells = [f"{statistics.mean(base):.2f}", f"{statistics.mean(novel):.2f}"]
            hm = harmonic_mean(statistics.mean(base), statistics.mean(novel))
            seeds = "/".join(str(len(row["seed"])) for row in rows)
            name = title(key).replace(f", base2novel, {shots} shots", "")
            paper = [] if not with_paper else ["" if papers[key] is None else f"{papers[key]:.2f}"]
            lines.append(f"| {name} | {seeds} | " + " | ".join([*cells, f"{hm:.2f}", *paper])
                         + " |")
        blocks.append("\n".join(lines))
    return blocks


def read_metrics(path, protocol):
    """A run's metrics.json: every value an accuracy, with the protocol's columns. A hand-edited
    one says what to do: train.py takes a readable one for a finished run and will not redo it."""
    values = read_json(path)
    if not isinstance(values, dict):
        return None, f"{path} is damaged (not a JSON object)"
    columns = ("base_acc", "novel_acc") if protocol == "base2novel" else ("accuracy",)
    missing = [c for c in columns if c not in values]
    fix = f"; restore it, or delete the run folder {os.path.dirname(path)} to run it again"
    if missing:
        return None, f"{path} has no {', '.join(missing)}{fix}"
    for key, value in values.items():
        if not is_accuracy(value):
            return None, f"{path}: {key} is {value!r}, not an accuracy (a number in [0, 100]){fix}"
    return values, None


def read_eval(path):
    """An eval_*.json beside a run (eval.py's result)."""
    e = read_json(path)
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


def harmonic_mean(base, novel):
    """HM = 2BN / (B + N), the base-to-novel summary number (CoCoOp, Sec. 4.1)."""
    return 2 * base * novel / (base + novel) if base + novel else 0.0


def fmt(values):
    """Seed values -> "mean ± std" (a single seed: its value)."""
    return (
        f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
        if len(values) > 1
        else f"{values[0]:.2f}"
    )
