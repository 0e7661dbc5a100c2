"""The papers' published numbers (CLIP ViT-B/16, mean of seeds 1 to 3), as one table:
data/published.csv, one row per number set a paper or its authors' README prints.

    protocol  base2novel | crossdataset | domaingen | fewshot
    method    zeroshot (CLIP with the data set's hand-written prompt) or a key of prompts.METHODS
    dataset   a key of data.DATASETS, or "average", the paper's average row:
              base2novel    over the 11 data sets; its HM is the one of the averaged base and
                            novel, as the papers compute it (not the mean of the 11 HMs)
              crossdataset  over the 10 targets of the model trained on ImageNet
              domaingen     over the 4 ImageNet shifts (v2, sketch, A, R)
              In crossdataset and domaingen, the "imagenet" row is that model on its source.
    shots     K of the protocol's table (16; zero-shot CLIP's row of the same table says 16 too)
    base, novel, hm   base-to-novel only (accuracy empty)
    accuracy  the other protocols (base, novel, hm empty)
    source    the paper and table, or the README, the numbers are read from

A number a paper does not give is empty here (None): PMPO's abstract gives its average HM only,
79.28 (arXiv 2305.06221), and no APLe number could be read (arXiv 2401.06827: only its abstract
was reachable); APLe keeps a row without numbers so that the table says so.

Not here, because no source could be read exactly:
  - fewshot: no row. CoOp's few-shot results are curves (and with a ResNet-50 CLIP); the
    per-data-set ViT-B/16 numbers for K = 1..16 are in the PromptSRC paper's appendix, Table 13
    (its authors in PromptSRC issues #5 and #14), which could not be read number by number here.
    None is typed in from memory.
  - KgCoOp's per-data-set base-to-novel rows (its CVPR 2023 Table 1): only the average, from the
    KgCoOp README. KgCoOp and IVLP have no cross-dataset or domain generalisation rows.
  - zero-shot CLIP in cross-dataset: MaPLe's and PromptSRC's Table 2 have no such row.

    python -m data.published   # prints the README's Results table
"""
import csv
import functools
import os

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published.csv")
PROTOCOLS = ("base2novel", "crossdataset", "domaingen", "fewshot")
COLUMNS = ("base", "novel", "hm", "accuracy")  # the number columns; shots is an int
# how the README names each method; the row order is the CSV's (the papers' order)
NAMES = dict(zeroshot="CLIP (zero-shot)", coop="CoOp", cocoop="CoCoOp", kgcoop="KgCoOp",
             ivlp="IVLP", maple="MaPLe", promptsrc="PromptSRC", aple="APLe", pmpo="PMPO")


@functools.lru_cache(maxsize=None)
def _rows(path):
    """The file's rows, read once: a tuple of dicts, numbers as float (int for shots), empty as
    None."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["shots"] = int(row["shots"])
        for column in COLUMNS:
            row[column] = float(row[column]) if row[column].strip() else None
    return tuple(rows)


def published(path=PATH):
    """Every row of data/published.csv in the file's order, as a new list of dicts (so a caller
    may change them): protocol, method, dataset, source as str; shots int; base, novel, hm,
    accuracy float or None."""
    return [dict(row) for row in _rows(path)]


def paper_number(protocol, method, dataset, shots, column):
    """(value, source) of one published number, e.g. paper_number("base2novel", "maple", "dtd",
    16, "novel") -> (59.18, "MaPLe (CVPR 2023) Table 1"); None where no paper gives it."""
    if column not in COLUMNS:
        raise ValueError(f"column must be one of {COLUMNS}, got {column!r}")
    for row in _rows(PATH):
        if (row["protocol"], row["method"], row["dataset"], row["shots"]) == (protocol, method,
                                                                             dataset, shots):
            return None if row[column] is None else (row[column], row["source"])
    return None


def results_table(path=PATH):
    """The README's Results table (Markdown): each method's base-to-novel average, Base / Novel /
    HM, and where it is printed. Rows in the file's order: zero-shot CLIP, then the methods."""
    lines = ["| method | Base / Novel / HM (papers) | source |", "|---|---|---|"]
    for row in _rows(path):
        if row["protocol"] != "base2novel" or row["dataset"] != "average":
            continue
        numbers = [row[c] for c in ("base", "novel", "hm")]
        cell = (" / ".join("-" if v is None else f"{v:.2f}" for v in numbers)
                if any(v is not None for v in numbers) else "no number could be read")
        lines.append(f"| {NAMES.get(row['method'], row['method'])} | {cell} | {row['source']} |")
    return "\n".join(lines)


def main():
    print(results_table())


if __name__ == "__main__":
    main()
