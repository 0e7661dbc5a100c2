"""data/published.csv: the papers' numbers are consistent with themselves (HM, averages), name
only known methods, data sets and protocols, each has a source, and the README's Results table is
what `python -m data.published` prints.

Each check is a function of the rows that returns its problems, so that
test_each_check_finds_a_wrong_row can show every one of them fail on a broken copy.
"""
import os
import re
import statistics

import pytest

import data
import prompts
from data.published import COLUMNS, PROTOCOLS, main, paper_number, published, results_table

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
ELEVEN = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
          "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")  # as benchmark.ELEVEN
SHIFTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")  # as benchmark.SHIFTS
# the data sets an "average" row is the mean of (crossdataset: the 10 targets, not the source)
AVERAGED = dict(base2novel=ELEVEN, crossdataset=ELEVEN[1:], domaingen=SHIFTS)


def hm_problems(rows):
    """HM = 2 B N / (B + N) wherever a row has all three (the average rows too: the papers' HM
    is the one of the averaged base and novel): a typed-in number that is off shows."""
    problems = []
    for r in rows:
        if None not in (r["base"], r["novel"], r["hm"]):
            hm = 2 * r["base"] * r["novel"] / (r["base"] + r["novel"])
            if abs(hm - r["hm"]) > 0.01:
                problems.append(f"{r['method']} {r['dataset']}: hm {r['hm']}, 2BN/(B+N) {hm:.3f}")
    return problems


def name_problems(rows):
    """Known protocols, methods and data sets, a source on every row, and the number columns
    that fit the protocol."""
    problems = []
    for r in rows:
        where = f"{r['protocol']} {r['method']} {r['dataset']}"
        if r["protocol"] not in PROTOCOLS:
            problems.append(f"{where}: protocol not one of {PROTOCOLS}")
        if r["method"] != "zeroshot" and r["method"] not in prompts.METHODS:
            problems.append(f"{where}: method neither zeroshot nor in prompts.METHODS")
        if r["dataset"] != "average" and r["dataset"] not in data.DATASETS:
            problems.append(f"{where}: data set neither average nor in data.DATASETS")
        if not r["source"].strip():
            problems.append(f"{where}: no source")
        own = ("base", "novel", "hm") if r["protocol"] == "base2novel" else ("accuracy",)
        if any(r[c] is not None for c in COLUMNS if c not in own):
            problems.append(f"{where}: base2novel fills base/novel/hm, the others accuracy")
    return problems


def key_problems(rows):
    """One row per (protocol, method, data set, shots): paper_number finds the first only."""
    seen, problems = set(), []
    for r in rows:
        key = (r["protocol"], r["method"], r["dataset"], r["shots"])
        if key in seen:
            problems.append(f"{key} twice")
        seen.add(key)
    return problems


def average_problems(rows):
    """An "average" row is the mean of the method's rows over the protocol's data sets (to 0.01,
    the papers' rounding), where the file has all of them; base-to-novel per column."""
    problems = []
    for avg in (r for r in rows if r["dataset"] == "average" and r["protocol"] in AVERAGED):
        names = AVERAGED[avg["protocol"]]
        own = {r["dataset"]: r for r in rows if (r["protocol"], r["method"], r["shots"])
               == (avg["protocol"], avg["method"], avg["shots"])}
        if not all(d in own for d in names):
            continue  # e.g. KgCoOp: the average only
        columns = ("base", "novel") if avg["protocol"] == "base2novel" else ("accuracy",)
        for c in columns:
            mean = statistics.mean(own[d][c] for d in names)
            if abs(mean - avg[c]) > 0.01:
                problems.append(f"{avg['protocol']} {avg['method']} {c}: average {avg[c]}, "
                                f"mean of the {len(names)} rows {mean:.3f}")
    return problems


def source_problems(rows):
    """Cross-dataset and domain generalisation evaluate one ImageNet model: its ImageNet accuracy
    is the same number in both."""
    imagenet = {}
    for r in rows:
        if r["protocol"] in ("crossdataset", "domaingen") and r["dataset"] == "imagenet":
            imagenet.setdefault((r["method"], r["shots"]), set()).add(r["accuracy"])
    return [f"{key}: ImageNet {sorted(values)}" for key, values in imagenet.items()
            if len(values) > 1]


CHECKS = (hm_problems, name_problems, key_problems, average_problems, source_problems)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_published_numbers(check):
    assert check(published()) == []


def test_each_check_finds_a_wrong_row():
    """Each check fails on a copy of the file with one wrong row."""
    def broken(change):
        rows = published()
        change(rows)
        return rows

    def find(rows, protocol, method, dataset):
        return next(r for r in rows if (r["protocol"], r["method"], r["dataset"])
                    == (protocol, method, dataset))

    def typo(rows):  # MaPLe DTD novel 59.18 typed as 58.18
        find(rows, "base2novel", "maple", "dtd")["novel"] = 58.18

    assert hm_problems(broken(typo))
    assert average_problems(broken(typo))  # the mean of its 11 novels moves by 0.09
    assert name_problems(broken(lambda rows: rows[0].update(method="copo")))
    assert name_problems(broken(lambda rows: rows[0].update(dataset="imagenet1k")))
    assert name_problems(broken(lambda rows: rows[0].update(protocol="base2new")))
    assert name_problems(broken(lambda rows: rows[0].update(source=" ")))
    assert name_problems(broken(lambda rows: rows[0].update(accuracy=70.0)))
    assert key_problems(broken(lambda rows: rows.append(dict(rows[0]))))
    assert average_problems(broken(
        lambda rows: find(rows, "domaingen", "coop", "imagenet_r").update(accuracy=75.51)))
    assert source_problems(broken(
        lambda rows: find(rows, "domaingen", "coop", "imagenet").update(accuracy=71.5)))


@pytest.mark.whole_registry
def test_rows_in_the_papers_order():
    """The base-to-novel averages, the README's rows: zero-shot CLIP, then prompts.METHODS; every
    method the README's first table lists has one (a forked method, with no paper yet, has none)."""
    methods = [r["method"] for r in published()
               if r["protocol"] == "base2novel" and r["dataset"] == "average"]
    with open(README) as f:
        listed = re.findall(r"^\| [^|]+ \| `prompts/(\w+)\.py` \|", f.read(), re.M)
    assert listed and set(listed) - {"zeroshot"} <= set(methods)
    assert methods == [m for m in ["zeroshot", *prompts.METHODS] if m in methods]


def test_paper_number():
    assert paper_number("base2novel", "maple", "dtd", 16, "novel") == (
        59.18, "MaPLe (CVPR 2023) Table 1")
    assert paper_number("base2novel", "pmpo", "average", 16, "base") is None  # not printed
    assert paper_number("base2novel", "pmpo", "average", 16, "hm")[0] == 79.28
    assert paper_number("fewshot", "coop", "dtd", 4, "accuracy") is None  # no such row
    with pytest.raises(ValueError):
        paper_number("base2novel", "maple", "dtd", 16, "novel_acc")


def test_readme_results_table_is_the_printed_one(capsys):
    """README.md's "## Results" table is `python -m data.published`, as printed."""
    main()
    printed = capsys.readouterr().out.strip()
    assert printed == results_table()
    with open(README) as f:
        section = f.read().split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    assert "\n".join(lines[start:end]) == printed, "run python -m data.published"
