"""eval.py --benchmark: a table's runs as ordinary train.py runs, shared out over
torchrun's processes through the run-folder lock, each done once; the table in the papers'
layout; a failed run reported."""
import os
import re
import subprocess
import sys

import pytest

import eval as eval_py
from tests import synthetic
from tests.synthetic import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["coop", "kgcoop"]  # text-only: the flags after -- fit both on the tiny CLIP
FAST = ["--model", "{model}", "--epochs", "1", "--batch_size", "2", "--workers", "0", "--threads",
        "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three folder: data sets of 4 classes each (2 base, 2 novel) and a tiny CLIP."""
    tmp = tmp_path_factory.mktemp("benchmark")
    datasets = [synthetic.write_folder(tmp / name, ["cat", "dog", "fish", "bird"], per_class=6,
                                       seed=i)
                for i, name in enumerate(("one", "two", "three"))]
    return tmp, [f"folder:{d}" for d in datasets], synthetic.save_tiny_clip(tmp / "tiny.pt")


def argv(world, out, *extra):
    tmp, datasets, model = world
    return ["--benchmark", "base2novel", "--methods", *METHODS, "--seeds", "1", "--datasets",
            *datasets, "--out", str(out), "--device", "cpu", "--shots", "2", *extra, "--",
            *[f.format(model=model) for f in FAST]]


def starts(out):
    """How often each run was started: the line train.py logs as a run begins, per run folder."""
    counts = {}
    for folder, _, files in os.walk(out):
        if "log.txt" in files:
            with open(os.path.join(folder, "log.txt")) as f:
                counts[folder] = sum(
                    1 for line in f if " on folder:" in line and "training images" in line
                )
    return counts


def test_torchrun_shares_the_runs_and_prints_the_serial_table(world, tmp_path):
    serial = eval_py.main(argv(world, tmp_path / "serial"))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "eval.py", *argv(world, tmp_path / "ranks")],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    end = re.search(r"\n\n\d+ runs, 2 process\(es\)", result.stdout).start()  # what rank 0 printed
    table = result.stdout[result.stdout.index("### "):end].strip()
    assert table == serial.strip().replace(str(tmp_path / "serial"), str(tmp_path / "ranks"))
    assert re.search(r"\| \*\*Average\*\* \|", table)  # three data sets, and their average
    runs = starts(tmp_path / "ranks")
    assert len(runs) == len(METHODS) * 3 and set(runs.values()) == {1}  # each run done once
    ranks = re.findall(r"^rank (\d) \(cpu\): train ", result.stdout, re.M)
    # both took runs, none twice
    assert sorted(set(ranks)) == ["0", "1"] and len(ranks) == len(runs)


def test_a_finished_benchmark_runs_nothing_again(world, tmp_path):
    first = eval_py.main(argv(world, tmp_path / "b"))
    again = eval_py.main(argv(world, tmp_path / "b"))
    assert first == again and set(starts(tmp_path / "b").values()) == {1}


def test_a_failed_run_is_reported_and_the_others_go_on(world, tmp_path, capsys):
    tmp, datasets, model = world
    broken = tmp_path / "broken"  # one class: nothing to split into base and novel
    synthetic.write_folder(broken, ["cat"], per_class=6)
    with pytest.raises(SystemExit) as e:
        eval_py.main(["--benchmark", "base2novel", "--methods", "coop", "--seeds", "1",
                      "--datasets", f"folder:{broken}", datasets[0], "--out", str(tmp_path / "c"),
                      "--device", "cpu", "--shots", "2", "--",
                      *[f.format(model=model) for f in FAST]])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert re.search(r"error: rank 0: the run in \S*folder_\S*broken\S* failed", err)
    assert len(starts(tmp_path / "c")) == 1  # the other data set's run finished


def test_bad_flags_for_the_runs_are_refused_before_any_run(world, tmp_path):
    with pytest.raises(SystemExit):
        eval_py.main(argv(world, tmp_path / "d", ) + ["--epochs", "-1"])
    assert not (tmp_path / "d").exists()
