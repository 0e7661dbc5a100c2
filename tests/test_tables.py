"""tables.py and eval.py --benchmark's edges: the papers' layout from run folders (one table per
method and K however the protocol varies its settings per data set, cross-dataset's two tables,
the paper's number beside ours, missing runs named), and what the benchmark refuses up front."""
import json
import os
import statistics

import pytest

import eval as eval_py
import options
import tables
from data.published import paper_number


def fake_run(root, method, dataset, seed, metrics, protocol="base2novel", evals=()):
    """A finished run folder with the settings train.py resolves for it (so CoOp on ImageNet
    records its protocol's 50 epochs), metrics.json and eval_*.json results."""
    folder = os.path.join(root, dataset, method, protocol, f"shots16_seed{seed}")
    os.makedirs(folder)
    cfg = options.recorded(options.config(method, dataset, protocol=protocol, seed=seed,
                                          device="cpu"))
    for name, obj in [("config.json", cfg), ("metrics.json", metrics),
                      *[(f"eval_{d}_all.json", dict(dataset=d, subsample="all", accuracy=a))
                        for d, a in evals]]:
        with open(os.path.join(folder, name), "w") as f:
            json.dump(obj, f)


def blocks(text):
    return {b.splitlines()[0]: b for b in ("\n" + text).split("\n### ")[1:]}


def test_one_table_per_method_with_the_paper_beside_it(tmp_path):
    runs = {("imagenet", 1): (76.0, 68.0), ("imagenet", 2): (77.0, 67.0),
            ("caltech101", 1): (98.0, 90.0), ("caltech101", 2): (97.0, 91.0)}
    for (dataset, seed), (base, novel) in runs.items():
        fake_run(tmp_path, "coop", dataset, seed, dict(base_acc=base, novel_acc=novel))
    grid = dict(methods=["coop"], datasets=["imagenet", "caltech101"], seeds=[1, 2])
    found = blocks(tables.summary([str(tmp_path)], grid))
    assert list(found) == ["coop, base2novel, 16 shots"]  # CoOp's ImageNet epochs split nothing
    table = found["coop, base2novel, 16 shots"]
    assert "protocol settings per data set: imagenet: epochs 50" in table
    for dataset in ("imagenet", "caltech101"):
        base = statistics.mean(runs[dataset, s][0] for s in (1, 2))
        novel = statistics.mean(runs[dataset, s][1] for s in (1, 2))
        ours = tables.harmonic_mean(base, novel)
        paper = paper_number("base2novel", "coop", dataset, 16, "hm")[0]
        assert f"| {dataset} | 2 | {base:.2f} ± 0.71 | {novel:.2f} ± 0.71 | {ours:.2f} | " \
               f"{paper:.2f} | {ours - paper:+.2f} |" in table
    assert "| **Average** | | 87.00 | 79.00 |" in table  # the papers' average is over 11: no Δ


def test_missing_runs_are_named(tmp_path):
    fake_run(tmp_path, "coop", "caltech101", 1, dict(base_acc=90.0, novel_acc=80.0))
    fake_run(tmp_path, "coop", "dtd", 1, dict(base_acc=70.0, novel_acc=50.0))
    fake_run(tmp_path, "coop", "dtd", 2, dict(base_acc=71.0, novel_acc=51.0))
    grid = dict(methods=["coop", "maple"], datasets=["caltech101", "dtd", "eurosat"], seeds=[1, 2])
    text = tables.summary([str(tmp_path)], grid)
    assert "missing: caltech101 seed 2" in text
    assert "missing: eurosat seed 1, 2 (no finished run)" in text
    assert "**Average** (2 of 3 data sets)" in text
    assert "missing: maple: no finished run" in text
    found = tables.summary([str(tmp_path)])  # --summary: the grid it finds
    assert "missing: caltech101 seed 2" in found and "eurosat" not in found


def test_cross_dataset_prints_transfer_and_domain_generalisation_apart(tmp_path):
    evals = [("caltech101", 90.0), ("dtd", 40.0), ("imagenetv2", 60.0), ("imagenet_a", 50.0)]
    fake_run(tmp_path, "coop", "imagenet", 1, dict(accuracy=70.0), "crossdataset", evals)
    found = blocks(tables.summary([str(tmp_path)]))
    transfer = found["coop, crossdataset, 16 shots: cross-dataset transfer"]
    shifts = found["coop, crossdataset, 16 shots: domain generalisation"]
    assert "| imagenet | 1 | 70.00 | 90.00 | 40.00 | 65.00 |" in transfer
    assert "| imagenet | 1 | 70.00 | 60.00 | 50.00 | 55.00 |" in shifts
    paper = paper_number("crossdataset", "coop", "caltech101", 16, "accuracy")[0]
    assert f"| Δ | | {70.0 - 71.51:+.2f} | {90.0 - paper:+.2f} |" in transfer


@pytest.mark.parametrize("flag", sorted(__import__("reproduce").OWNED))
def test_flags_the_benchmark_owns_are_refused_after_the_dashes(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        eval_py.main(["--benchmark", "toy", "--out", str(tmp_path / "b"), "--", f"--{flag}", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"--{flag} after -- is the benchmark's" in err
    assert not os.path.exists(tmp_path / "b")


def test_an_empty_data_root_is_one_message_and_no_folder(tmp_path):
    with pytest.raises(SystemExit) as stop:
        eval_py.main(["--benchmark", "base2novel", "--methods", "coop", "--root",
                      str(tmp_path / "empty"), "--out", str(tmp_path / "runs"), "--device", "cpu"])
    message = str(stop.value.code)
    assert message.startswith("error: 11 data set(s)") and "python -m data.prepare" in message
    assert "\n" not in message and not os.path.exists(tmp_path / "runs")
