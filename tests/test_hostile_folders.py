"""Hostile folders and files around a run: which folder is ours to write in, empty values of the
flags that name a file, JSON nested past Python's recursion limit, and a hand-edited metrics.json.

A user's files are compared byte for byte before and after ("lost" otherwise); bad input ends in
one `error:` line that names the file or flag, never in a traceback.
"""
import json

import pytest

import eval as eval_py
import options
import tables
import train
from tests import synthetic
# one_thread and world are fixtures
from tests.synthetic import argv, interrupted, message_of, one_thread, snapshot, world  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON that json.load cannot read: RecursionError


def refused_untouched(call, folder, capsys):
    """call() stops with one clear message and leaves every file under folder as it was."""
    before = snapshot(folder)
    text = message_of(call, capsys)
    assert snapshot(folder) == before, "lost"
    return text


# -- lost: only a folder with our marker (or an empty one) is ours ---------------------------------

def run_config(world):
    """A config.json with every key train.py's have, as a run from before the marker wrote it."""
    return json.dumps(dict(method="coop", dataset="caltech101", protocol="base2novel", shots=2,
                           seed=1, model=world.model)).encode()


USERS = {  # what a user's folder holds; None: a run's config.json (run_config)
    "a run's keys in the user's config.json": {"config.json": None},
    "a run's config.json beside the user's notes": {"config.json": None, "notes.txt": b"mine\n"},
    "a file named like the lock": {".lock": b"precious"},
    "a file named like a temporary config.json": {".config.json.k3j_9x2a.tmp": b"precious"},
    "the lock's and a temporary name": {".lock": b"1234", ".prompt_learner.pt.abcdefgh.tmp": b"x"},
    "checkpoint-named and a cut fewshot.json": {"prompt_learner.pt": b"x", "fewshot.json": b"{"},
}


@pytest.mark.parametrize("case", USERS)
def test_a_folder_without_the_marker_is_the_users(world, tmp_path, capsys, case):
    """Names or keys like ours do not make a folder ours: only the marker does (or nothing)."""
    out = tmp_path / "mine"
    out.mkdir()
    for name, content in USERS[case].items():
        (out / name).write_bytes(run_config(world) if content is None else content)
    text = refused_untouched(lambda: train.main(argv(world, out)), out, capsys)
    assert "not a run folder" in text and str(out) in text, text


def test_the_benchmark_leaves_a_users_folder_in_a_runs_place_alone(world, tmp_path, capsys):
    """The benchmark locks each run's folder before train.py runs in it: a user's .lock there is
    theirs all the same, and nothing runs."""
    runs = tmp_path / "runs"
    mine = runs / "caltech101" / "coop" / "base2novel" / "shots2_seed1"
    mine.mkdir(parents=True)
    (mine / ".lock").write_bytes(b"precious")
    benchmark = ["--benchmark", "base2novel", "--methods", "coop", "--seeds", "1", "--datasets",
                 "caltech101", "--root", world.root, "--out", str(runs), "--device", "cpu",
                 "--shots", "2", "--", "--model", world.model, "--epochs", "1", "--workers", "0"]
    text = refused_untouched(lambda: eval_py.main(benchmark), runs, capsys)
    assert str(mine) in text and "not a run folder" in text, text


# -- silent: an empty value for a flag that names a file -------------------------------------------

TRAIN = ["--method", "coop", "--dataset", "caltech101", "--device", "cpu"]
EVAL = ["--method", "zeroshot", "--dataset", "caltech101", "--device", "cpu"]


EMPTY = [pytest.param(parse, [*base, flag, ""], flag, id=f"{name} {flag} ''")
         for parse, base, name, flags in [
             (options.parse_args, TRAIN, "train.py", ("--fewshot_file", "--model", "--root",
                                                      "--out")),
             (eval_py.parse_args, EVAL, "eval.py", ("--ckpt", "--out", "--model", "--root"))]
         for flag in flags]
EMPTY += [pytest.param(options.parse_args, [*TRAIN, "--root="], "--root", id="train.py --root="),
          pytest.param(eval_py.parse_args, ["--summary", "runs", ""], "--summary",
                       id="eval.py --summary runs ''")]


@pytest.mark.parametrize("parse, args, flag", EMPTY)
def test_an_empty_path_is_refused(capsys, parse, args, flag):
    """"" would fall back to a default (or to $DATA) without a word."""
    assert f"{flag} is empty" in message_of(lambda: parse(args), capsys)


# -- tracebacks: JSON nested 100,000 deep ----------------------------------------------------------

def finished_run(folder, seed):
    """What tables.summary reads of a finished base-to-novel run."""
    folder.mkdir(parents=True)
    cfg = dict(method="coop", protocol="base2novel", dataset="toy", shots=16, seed=seed)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "metrics.json").write_text(json.dumps(dict(base_acc=90.0, novel_acc=60.0, hm=72.0)))
    (folder / "eval_x_all.json").write_text(json.dumps(dict(dataset="x", subsample="all",
                                                            accuracy=50.0)))


@pytest.mark.parametrize("name", ["config.json", "metrics.json", "eval_x_all.json"])
def test_summary_skips_deep_json_as_damaged(tmp_path, name):
    """json.load's RecursionError is a damaged file, named and skipped like any other."""
    finished_run(tmp_path / "good", 1)
    finished_run(tmp_path / "deep", 2)
    (tmp_path / "deep" / name).write_text(DEEP)
    text = tables.summary([str(tmp_path)])
    skipped = [line for line in text.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and str(tmp_path / "deep" / name) in skipped[0], text
    seeds = 2 if name.startswith("eval_") else 1  # a bad eval_*.json leaves its run's metrics
    assert "damaged" in skipped[0] and f"| toy | {seeds} |" in text, text


@pytest.mark.parametrize("name", ["config.json", "metrics.json", "fewshot.json"])
def test_deep_json_in_an_interrupted_run(world, tmp_path, capsys, name):
    """config.json: the checkpoint's copy; metrics.json: evaluated again; fewshot.json: named."""
    out = tmp_path / "run"
    interrupted(world, out)
    (out / name).write_text(DEEP)
    if name == "fewshot.json":
        text = message_of(lambda: train.main(argv(world, out)), capsys)
        assert f"{out / name} is damaged" in text, text
        return
    train.main(argv(world, out))
    assert json.loads((out / "metrics.json").read_text())["base_acc"] >= 0
    assert json.loads((out / "config.json").read_text())["method"] == "coop"


def test_deep_fewshot_file_is_named(world, tmp_path, capsys):
    path = tmp_path / "shots.json"
    path.write_text(DEEP)
    out = tmp_path / "run"
    text = message_of(lambda: train.main(argv(world, out, "coop", "--fewshot_file", str(path))),
                      capsys)
    assert f"--fewshot_file {path}" in text and "not JSON" in text, text
    assert not out.exists()


@pytest.mark.parametrize("dataset, name", [("toy", "toy/world.json"),
                                           ("caltech101", "caltech-101/split_zhou_Caltech101.json"),
                                           ("folder", "split.json")])
def test_deep_json_in_a_data_set_is_named(tmp_path, capsys, dataset, name):
    """The data set's own JSON (the toy world's stamp, a split file) nested too deep."""
    root = tmp_path / "root"
    if dataset == "toy":
        (root / "toy").mkdir(parents=True)
        (root / "toy" / "split.json").write_text('{"train": [], "val": [], "test": []}')
    elif dataset == "caltech101":
        synthetic.write_caltech101(str(root), ["cat", "dog"], train=1, val=1, test=1)
    else:
        synthetic.write_folder(root, ["cat", "dog"])
        dataset = f"folder:{root}"
    (root / name).write_text(DEEP)
    text = message_of(lambda: train.read_dataset(dataset, str(root)), capsys)
    assert f"{root / name} is not a valid" in text and "not JSON" in text, text


# -- unclear: a finished run's hand-edited metrics.json --------------------------------------------

@pytest.mark.parametrize("metrics", [dict(base_acc="high", novel_acc=60.0),
                                     dict(base_acc=90.0, novel_acc=60.0, hm=250.0),
                                     dict(novel_acc=60.0)], ids=["text", "250", "no base_acc"])
def test_a_hand_edited_metrics_json_says_what_to_do(tmp_path, metrics):
    """train.py refuses a finished run: the note names the file and how to run it again."""
    finished_run(tmp_path / "good", 1)
    finished_run(tmp_path / "edited", 2)
    path = tmp_path / "edited" / "metrics.json"
    path.write_text(json.dumps(metrics))
    text = tables.summary([str(tmp_path)])
    skipped = [line for line in text.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and str(path) in skipped[0], text
    assert "restore it" in skipped[0], text
    assert f"delete the run folder {tmp_path / 'edited'} to run it again" in skipped[0], text
