"""The papers' tables from run folders: mean ± std over seeds per data set, the Average row, the
side-by-side table of methods, and the published numbers beside them. eval.py --summary and
--benchmark print them.
"""
import glob
import json
import os
import statistics

import options
import prompts
from runfolder import read_config, read_json


# may differ within a row: they change no result (threads, cuda_graphs: to float rounding)
NOT_SETTINGS = ("seed", "fewshot_file", "dataset", *options.SPEED_KEYS)


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
        try:
            cfg, why = read_config(os.path.join(folder, "config.json")), None
        except ValueError as e:
            cfg, why = None, str(e)
        if cfg is None and why is None:
            why = f"{folder}/config.json is missing or damaged"
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
            hm = harmonic_mean(statistics.mean(base), statistics.mean(novel))
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
            hm = harmonic_mean(statistics.mean(row["base_acc"]),
                                     statistics.mean(row["novel_acc"]))
            cells.append(f"{hm:.2f}")
        lines.append(f"| {dataset} | {len(row['seed'])} | " + " | ".join(cells) + " |")
    if len(table) > 1:
        cells = [f"{statistics.mean(means[c]):.2f}" if means[c] else "" for c in columns]
        if protocol == "base2novel":
            hm = harmonic_mean(statistics.mean(means["base_acc"]),
                                     statistics.mean(means["novel_acc"]))
            cells.append(f"{hm:.2f}")
        lines.append("| **Average** | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_metrics(path, protocol):
    """A run's metrics.json: every value an accuracy, with the protocol's columns."""
    values = read_json(path)
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
