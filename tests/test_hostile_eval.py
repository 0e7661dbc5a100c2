"""Hostile inputs to eval.py, as classes of cases: every key of a checkpoint missing, of the wrong
type or value; every field --summary reads missing, of the wrong type, true/false, out of range or
NaN; --out as an existing file, a folder, a path ending in /, an unwritable place; checkpoints of
unfinished runs; two evaluations to one --out.

Every case ends in the right result or a SystemExit whose message names the file and the problem
(no traceback), and leaves the user's files as they were.
"""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

import eval as eval_py
import options
import checkpoint
import tables
import train
from tests import synthetic
from tests.synthetic import CLASSES, argv, message_of, one_thread, snapshot  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile_eval")
    root = synthetic.write_caltech101(str(tmp / "data"), CLASSES, train=3, val=1, test=2)
    world = SimpleNamespace(tmp=tmp, root=root, model=synthetic.save_tiny_clip(tmp / "tiny.pt"))
    world.run = tmp / "run"
    train.main(argv(world, world.run, "coop"))
    world.ckpt = torch.load(world.run / "prompt_learner.pt", weights_only=True)
    return world


def evaluate(world, ckpt, *extra):
    return eval_py.main(["--ckpt", str(ckpt), "--dataset", "caltech101", "--root", world.root,
                         "--workers", "0", *extra])


# -- a checkpoint: every key missing, of the wrong type, of a wrong value --------------------------

def wrong_type(value):
    return "x" if not isinstance(value, str) else 7


def edits(ckpt):
    """(case id, function(checkpoint dict) -> the edited object, a fragment of the message)."""
    cases = []
    for key in ckpt:
        # without a method or state_dict, it is no prompt checkpoint at all
        said = "not a prompt checkpoint" if key in ("method", "state_dict") else key
        if key in checkpoint.PROMPT_CHECKPOINT:
            cases.append((f"{key} missing", lambda c, k=key: c.pop(k) and c, said))
            cases.append((f"{key} wrong type",
                          lambda c, k=key: c.update({k: wrong_type(c[k])}) or c,
                          "state_dict" if key == "state_dict" else said))
    for key in (*checkpoint.CONFIG_STRINGS, "n_ctx", "ctx_init"):
        cases.append((f"config.{key} missing", lambda c, k=key: c["config"].pop(k) and c, key))
    for key, value in ckpt["config"].items():
        if isinstance(value, (int, float, str)) and value is not None:
            cases.append((f"config.{key} wrong type",
                           lambda c, k=key: c["config"].update({k: [1]}) or c, key))
    learned = list(ckpt["state_dict"])
    cases += [
        ("not a dict", lambda c: [c], "not a prompt checkpoint"),
        ("state_dict a list", lambda c: c.update(state_dict=list(c["state_dict"].values())) or c,
         "state_dict"),
        ("state_dict empty", lambda c: c.update(state_dict={}) or c, "state_dict"),
        ("state_dict value not a tensor",
         lambda c: c["state_dict"].update({learned[0]: [1.0]}) or c, learned[0]),
        ("method unknown", lambda c: c.update(method="cocop") or c, "not a prompt checkpoint"),
        ("method not its config's", lambda c: c.update(method="pmpo") or c, "config says"),
        ("classnames empty", lambda c: c.update(classnames=[]) or c, "classnames"),
        ("classnames with null", lambda c: c.update(classnames=[None, "dog"]) or c,
         "classnames"),
        ("epoch negative", lambda c: c.update(epoch=-1) or c, "epoch"),
        ("epoch a bool", lambda c: c.update(epoch=True) or c, "epoch"),
        ("clip_architecture empty", lambda c: c.update(clip_architecture={}) or c,
         "clip_architecture"),
        ("clip_architecture another CLIP",
         lambda c: c["clip_architecture"].update(text_layers=12) or c, "another CLIP"),
        ("config.n_ctx another value", lambda c: c["config"].update(n_ctx=7) or c, "shapes"),
    ]
    for key in learned:
        cases += [
            (f"{key} missing", lambda c, k=key: c["state_dict"].pop(k) is None or c, "missing"),
            (f"{key} wrong shape",
             lambda c, k=key: c["state_dict"].update({k: c["state_dict"][k][..., :1]}) or c,
             "shapes"),
            (f"{key} integer", lambda c, k=key: c["state_dict"].update(
                {k: c["state_dict"][k].long()}) or c, "shapes"),
            (f"{key} NaN", lambda c, k=key: c["state_dict"][k].fill_(float("nan")) is None or c,
             "NaN"),
        ]
    cases.append(("unknown learned tensor",
                  lambda c: c["state_dict"].update({"prompt_learner.extra": torch.zeros(2)}) or c,
                  "unexpected"))
    return cases


def ckpt_cases():
    """The case ids, from the keys a coop checkpoint holds (the real one is made by a fixture)."""
    config = options.config("coop", "caltech101", device="cpu")
    ckpt = dict(method="coop", config=config, classnames=["cat"], epoch=2, clip_architecture={},
                state_dict={"prompt_learner.ctx": torch.zeros(4, 64)})
    return [case[0] for case in edits(ckpt)]


@pytest.mark.parametrize("case", ckpt_cases())
def test_hostile_checkpoint(world, tmp_path, capsys, case):
    """A finished run's folder, its checkpoint edited one way: refused, naming the file."""
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    ckpt = torch.load(run / "prompt_learner.pt", weights_only=True)
    cases = {c[0]: c[1:] for c in edits(ckpt)}
    if case not in cases:  # a config key this run's coop checkpoint does not hold
        pytest.skip(f"{case}: not in this checkpoint")
    edit, fragment = cases[case]
    torch.save(edit(ckpt), run / "prompt_learner.pt")
    before = snapshot(tmp_path)
    text = message_of(lambda: evaluate(world, run / "prompt_learner.pt"), capsys)
    assert str(run / "prompt_learner.pt") in text and fragment in text, text
    assert snapshot(tmp_path) == before


def test_small_vocabulary_clip_is_refused_at_load(world, tmp_path, capsys):
    """Token ids >= the embedding's rows would index out of range (or wrap on CUDA)."""
    small = synthetic.save_tiny_clip(tmp_path / "small.pt", vocab_size=512)
    for extra in (["--model", small], ["--method", "zeroshot", "--model", small]):
        args = (["--dataset", "caltech101", "--root", world.root, "--workers", "0", *extra]
                + (["--ckpt", str(world.run / "prompt_learner.pt")] if len(extra) == 2 else []))
        text = message_of(lambda: eval_py.main(args + ["--out", str(tmp_path / "e.json")]),
                          capsys)
        assert small in text and "512 token embeddings" in text
    assert not (tmp_path / "e.json").exists()


# -- unfinished runs: refused, or with --allow_unfinished marked and left out of --summary ---------

def unfinished(world, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    if how == "killed":
        os.remove(run / "metrics.json")
    elif how == "damaged metrics":
        (run / "metrics.json").write_text("")
    else:  # still training: no metrics.json, its .lock held
        os.remove(run / "metrics.json")
        (run / ".lock").write_text("1")
    return run


@pytest.mark.parametrize("how", ["killed", "damaged metrics", "still training"])
def test_unfinished_checkpoint(world, tmp_path, capsys, how):
    run = unfinished(world, tmp_path, how)
    before = snapshot(tmp_path)
    text = message_of(lambda: evaluate(world, run / "prompt_learner.pt"), capsys)
    assert str(run / "prompt_learner.pt") in text and "not finished" in text
    assert "--allow_unfinished" in text.replace("-allow-", "-allow_")
    assert snapshot(tmp_path) == before
    result = evaluate(world, run / "prompt_learner.pt", "--allow-unfinished")
    assert result["unfinished"] is True and result["epoch"] == world.ckpt["epoch"]
    # the finished run beside it, with this result copied in: --summary leaves it out, and says so
    done = tmp_path / "runs" / "done"
    shutil.copytree(world.run, done)
    shutil.copy(run / "eval_caltech101_all.json", done / "eval_other_all.json")
    text = tables.summary([str(tmp_path / "runs")])
    assert "unfinished" in text and str(done / "eval_other_all.json") in text
    assert "caltech101 (all)" not in text


# -- --summary: every field it reads x {missing, wrong type, bool, out of range, NaN} --------------

BAD_VALUES = {"missing": None, "text": "high", "bool": True, "250": 250.0, "-5": -5,
              "NaN": float("nan"), "list": [50.0]}


def summary_cases():
    cases = []
    for field in ("base_acc", "novel_acc", "hm"):
        cases += [("metrics.json", field, bad) for bad in BAD_VALUES]
    for field in ("accuracy", "dataset", "subsample"):
        cases += [("eval_x_all.json", field, bad) for bad in BAD_VALUES]
    for field in ("method", "protocol", "dataset", "shots", "seed"):
        cases += [("config.json", field, bad) for bad in BAD_VALUES]
    cases += [(name, None, "not an object") for name in ("metrics.json", "eval_x_all.json",
                                                         "config.json")]
    return cases


def fake_run(folder, seed, **metrics):
    folder.mkdir(parents=True)
    cfg = dict(method="coop", protocol="base2novel", dataset="toy", shots=16, seed=seed)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "metrics.json").write_text(json.dumps(dict(base_acc=90.0, novel_acc=60.0, hm=72.0,
                                                         **metrics)))
    (folder / "eval_x_all.json").write_text(json.dumps(dict(dataset="x", subsample="all",
                                                            accuracy=50.0)))


@pytest.mark.parametrize("name, field, bad", summary_cases(), ids=str)
def test_summary_skips_a_bad_file_and_prints_the_rest(tmp_path, name, field, bad):
    fake_run(tmp_path / "good1", 1)
    fake_run(tmp_path / "good2", 2)
    fake_run(tmp_path / "bad", 3)
    path = tmp_path / "bad" / name
    content = json.loads(path.read_text())
    if bad == "not an object":
        content = [content]
    elif bad == "missing":
        content.pop(field)
    else:
        content[field] = BAD_VALUES[bad]
    path.write_text(json.dumps(content))
    before = snapshot(tmp_path)
    text = tables.summary([str(tmp_path)])
    assert snapshot(tmp_path) == before
    skipped = [line for line in text.splitlines() if line.startswith("skipped")]
    if (field in ("method", "dataset") and bad == "text") or (field, bad) == ("hm", "missing"):
        # a text there is a valid method / data set name (its own table); HM is recomputed
        assert not skipped, text
        return
    assert len(skipped) == 1 and str(path.parent) in skipped[0], text
    assert field is None or field in skipped[0] or bad == "not an object"
    # the other runs' table; a bad eval_*.json leaves its run's own metrics in
    seeds = 3 if name == "eval_x_all.json" else 2
    assert f"| toy | {seeds} | 90.00 ± 0.00 | 60.00 ± 0.00 |" in text, text


# -- --out x {existing file, folder, trailing slash, unwritable, another eval.py first} ------------

def out_cases(tmp_path):
    (tmp_path / "mine.json").write_text("my result")
    (tmp_path / "folder").mkdir()
    (tmp_path / "a file").write_text("x")
    return {"existing file": (str(tmp_path / "mine.json"), "exists"),
            "existing folder": (str(tmp_path / "folder"), "as a folder"),
            "existing folder/": (str(tmp_path / "folder") + "/", "as a folder"),
            "new folder/": (str(tmp_path / "newdir") + "/", "as a folder"),
            "under a file": (str(tmp_path / "a file" / "e.json"), "is a file")}


@pytest.mark.parametrize("case", ["existing file", "existing folder", "existing folder/",
                                  "new folder/", "under a file"])
def test_bad_out_is_refused_before_evaluating(world, tmp_path, capsys, monkeypatch, case):
    out, fragment = out_cases(tmp_path)[case]
    before = snapshot(tmp_path)
    monkeypatch.setattr(train, "evaluate", lambda *a: pytest.fail("evaluated before refusing"))
    text = message_of(lambda: evaluate(world, world.run / "prompt_learner.pt", "--out", out),
                      capsys)
    assert out in text and fragment in text
    assert snapshot(tmp_path) == before


def test_unwritable_out_is_refused_before_evaluating(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root writes anywhere
    monkeypatch.setattr(train, "evaluate", lambda *a: pytest.fail("evaluated before refusing"))
    out = str(tmp_path / "e.json")
    text = message_of(lambda: evaluate(world, world.run / "prompt_learner.pt", "--out", out),
                      capsys)
    assert out in text and "cannot be written" in text and os.listdir(tmp_path) == []


def test_two_evaluations_to_one_out_keep_the_first(world, tmp_path, capsys, monkeypatch):
    """The second eval.py writes after the first one's check and result: it is told, the first
    result stays. Simulated by writing the file while this one evaluates."""
    out = tmp_path / "e.json"
    real = train.evaluate

    def other_process_first(*args):
        out.write_text('{"accuracy": 1.0}')
        return real(*args)
    monkeypatch.setattr(train, "evaluate", other_process_first)
    text = message_of(lambda: evaluate(world, world.run / "prompt_learner.pt", "--out", str(out)),
                      capsys)
    assert str(out) in text and "another process" in text
    assert out.read_text() == '{"accuracy": 1.0}' and os.listdir(tmp_path) == ["e.json"]


def test_prompts_of_another_clip_file_are_refused(world, tmp_path, capsys):
    """The same architecture, other weights (a retrained CLIP): the run recorded its CLIP's sha256,
    and eval.py will not apply its prompts to another file. The result records the file's sha256."""
    other = synthetic.save_tiny_clip(tmp_path / "other.pt", seed=1)
    with pytest.raises(SystemExit) as e:
        evaluate(world, world.run / "prompt_learner.pt", "--model", other,
                 "--out", str(tmp_path / "a.json"))
    assert "learned on another CLIP file" in str(e.value) and other in str(e.value)
    assert not (tmp_path / "a.json").exists()
    result = evaluate(world, world.run / "prompt_learner.pt", "--out", str(tmp_path / "b.json"))
    assert result["clip_sha256"] == world.ckpt["config"]["clip_sha256"]
