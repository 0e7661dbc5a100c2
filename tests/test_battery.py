"""The reliability battery: bad values, kills and full disks at every write, hostile files.

Every case must end in one of two ways: the run's normal result, or a message that says what is
wrong (SystemExit with "error:" or argparse's usage error). Never another exception (a traceback),
never a wrong result without a word, never a run folder that cannot be resumed to the uninterrupted
run's exact prompts. Kills are simulated at each atomic write (clip.files.atomic_write) by raising
from os.fsync (killed while writing) or os.replace (killed before the rename); a full disk by a file
whose write raises ENOSPC. The cases are tables, so their count is the number of inputs tried.
"""
import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as eval_py
import options
import prompts
import train
from prompts.common import OPTION_HELP
from tests import synthetic
# one_thread and world are fixtures
from tests.synthetic import (Killed, argv, interrupted, load_ckpt, message_of,  # noqa: F401
                             one_thread, world)

pytestmark = pytest.mark.usefixtures("one_thread")

def same_run(a, b):
    """Bit-identical learned tensors and identical metrics."""
    ka, kb = load_ckpt(a), load_ckpt(b)
    assert ka["state_dict"].keys() == kb["state_dict"].keys() and ka["epoch"] == kb["epoch"]
    for k in ka["state_dict"]:
        assert torch.equal(ka["state_dict"][k], kb["state_dict"][k]), k
    with open(os.path.join(a, "metrics.json")) as fa, open(os.path.join(b, "metrics.json")) as fb:
        assert json.load(fa) == json.load(fb)


@pytest.fixture(scope="module")
def reference(world):
    """Uninterrupted runs, and the files each one writes, in order."""
    refs = {}
    for method in ("coop", "aple"):
        out = world.tmp / "ref" / method
        writes = []
        with pytest.MonkeyPatch.context() as mp:
            real = os.replace
            mp.setattr(os, "replace", lambda src,
                       dst: writes.append(os.path.basename(dst)) or real(src, dst))
            train.main(argv(world, out, method))
        refs[method] = SimpleNamespace(out=out, writes=writes)
    return refs


# -- bad values: refused before anything exists ----------------------------------------------------

BAD_TRAIN_ARGS = [  # (method, extra argv, a fragment of the message)
    ("pmpo", ["--fusion", "features"], "--fusion must be feature or logit"),
    ("pmpo", ["--inject", "all"], "--inject must be every or first"),
    ("aple", ["--first", "both"], "--first must be language or vision"),
    ("coop", ["--protocol", "zeroshot"], "--protocol must be base2novel, fewshot or crossdataset"),
    ("coop", ["--precision", "fp8"], "--precision must be"),
    ("coop", ["--precision", "fp16"], "fp16 needs a CUDA device"),
    ("coop", ["--augment_on_device", "yes"], "--augment_on_device must be auto, on or off"),
    ("coop", ["--text-checkpointing", "1"], "--text_checkpointing must be auto, on or off"),
    ("pmpo", ["--prior", "maybe"], "expected yes or no"),
    ("aple", ["--adapter", "2"], "expected yes or no"),
    ("aple", ["--adapter_at_test", ""], "expected yes or no"),
    ("coop", ["--lr", "-1"], "--lr must be > 0"),
    ("coop", ["--lr", "0"], "--lr must be > 0"),
    ("coop", ["--lr", "nan"], "--lr must be > 0"),
    ("coop", ["--lr", "inf"], "--lr must be > 0"),
    ("coop", ["--lr", "fast"], "invalid float value"),
    ("coop", ["--batch_size", "0"], "--batch_size must be >= 1"),
    ("coop", ["--batch-size", "-4"], "--batch_size must be >= 1"),
    ("coop", ["--batch_size", "2.5"], "invalid int value"),
    ("coop", ["--shots", "-3"], "--shots must be >= 1"),
    ("coop", ["--shots", "0"], "--shots must be >= 1"),
    ("coop", ["--epochs", "-1"], "--epochs must be >= 0"),
    ("coop", ["--eval_batch_size", "0"], "--eval_batch_size must be >= 1"),
    ("coop", ["--workers", "-1"], "--workers must be >= 0"),
    ("coop", ["--momentum", "1.5"], "--momentum must be between 0 and 1"),
    ("coop", ["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    ("coop", ["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0"),
    ("coop", ["--warmup_lr=-1e-5"], "--warmup_lr must be >= 0"),
    # argparse: looks like a flag
    ("coop", ["--warmup_lr", "-1e-5"], "argument --warmup_lr: expected one argument"),
    ("coop", ["--seed", "-1"], "--seed must be >= 0"),
    ("coop", ["--n_ctx", "0"], "--n_ctx must be >= 1"),
    ("coop", ["--n_ctx", "four"], "invalid int value"),
    ("pmpo", ["--n_prompts", "0"], "--n_prompts must be >= 1"),
    ("pmpo", ["--n_prompts", "3"], "n_prompts must be between 1 and the 2 prompted layers"),
    ("pmpo", ["--depth", "3"], "depth must be between 1 and the 2 vision layers"),
    ("pmpo", ["--depth", "0"], "--depth must be >= 1"),
    ("aple", ["--kl_form", "sum"], "--kl_form must be distill or promptsrc"),
    ("aple", ["--kl_temperature", "0"], "--kl_temperature must be > 0"),
    ("aple", ["--teacher_input", "clean"], "--teacher_input must be raw or filtered"),
    ("aple", ["--stage_schedule", "cosine"], "--stage_schedule must be one or restart"),
    ("aple", ["--depth", "0"], "--depth must be >= 1"),
    ("aple", ["--depth", "3"], "depth must be between 1 and the 2 layers"),
    ("aple", ["--stage_epochs", "1", "-1", "1"], "--stage_epochs must be >= 0"),
    ("aple", ["--stage_epochs", "1", "1"], "expected 3 arguments"),
    ("aple", ["--sigma", "0"], "--sigma must be > 0"),
    ("aple", ["--alpha", "1.5"], "--alpha must be between 0 and 1"),
    ("aple", ["--kl_weight", "-1"], "--kl_weight must be >= 0"),
    ("aple", ["--n_ctx_vision", "0"], "--n_ctx_vision must be >= 1"),
    ("coop", ["--device", "cuda"], "no CUDA GPU is available"),
    ("coop", ["--device", "cuda:3"], "no CUDA GPU is available"),
    ("coop", ["--device", "tpu0"], "is not a device"),
    ("coop", ["--method", "cocop"],
     "--method must be one of coop, cocoop, kgcoop, ivlp, maple, promptsrc, aple, pmpo"),
    ("coop", ["--frobnicate", "1"], "unrecognized arguments"),
    ("coop", ["--dataset", "caltech10"], "unknown dataset"),
    ("coop", ["--dataset", "oxford_pets"], "data.prepare"),
    ("coop", ["--dataset", "folder:/nonexistent/pets"], "folder not found"),
    ("coop", ["--model", "/nonexistent/clip.pt"], "/nonexistent/clip.pt"),
    ("coop", ["--model", "ViT-B/99"], "not found"),
    ("coop", ["--fewshot_file", "/nonexistent/fewshot.json"], "/nonexistent/fewshot.json"),
    ("coop", ["--ctx_init", " ".join(["word"] * 100)], "too long for context length 77"),
    ("coop", ["--ctx_init", "x" * 5000], "too long for context length 77"),
    ("pmpo", ["--n_ctx", "100", "--ctx_init", ""], "--n_ctx must be between 1 and 73"),
    ("coop", ["--root", "/dev/null"], "data root not found"),
    ("coop", ["--model", "/tmp"], "not found"),
    ("coop", ["--out", ""], "--out is empty"),
]


@pytest.mark.parametrize("method, bad, fragment", BAD_TRAIN_ARGS,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_train_value(world, tmp_path, capsys, method, bad, fragment):
    out = tmp_path / "run"
    assert fragment in message_of(lambda: train.main(argv(world, out, method, *bad)), capsys)
    assert not out.exists()


def write_file(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return str(path)


def nan_clip(world, tmp_path):
    state = torch.load(world.model, weights_only=True)
    state["ln_final.weight"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    return str(tmp_path / "nan.pt")


def one_class_data(world, tmp_path):
    return synthetic.write_caltech101(str(tmp_path / "one"), ["cat"], train=3, val=1, test=2)


BAD_TRAIN_FILES = [  # (what, a function(world, tmp_path) -> extra argv, fragment)
    ("--out is a file", lambda w, t: ["--out", write_file(t / "run", b"mine")], "is a file"),
    ("--out inside a file", lambda w, t: ["--out", os.path.join(write_file(t / "f", b"x"), "run")],
     "is a file"),
    ("--model is text", lambda w, t: ["--model", write_file(t / "m.pt", b"not weights")], "m.pt"),
    ("--model is empty", lambda w, t: ["--model", write_file(t / "m.pt", b"")], "m.pt"),
    ("--model holds NaN", lambda w, t: ["--model", nan_clip(w, t)], "NaN"),
    ("--fewshot_file is empty", lambda w, t: ["--fewshot_file", write_file(t / "f.json", b"")],
     "f.json"),
    ("--fewshot_file is a list", lambda w,
     t: ["--fewshot_file", write_file(t / "f.json", b"[1, 2]")], "f.json"),
    ("one class, base2novel", lambda w, t: ["--root", one_class_data(w, t)],
     "too few to split into base and novel"),
]


@pytest.mark.parametrize("what, extra, fragment", BAD_TRAIN_FILES,
                         ids=[c[0] for c in BAD_TRAIN_FILES])
def test_bad_train_file(world, tmp_path, capsys, what, extra, fragment):
    args = argv(world, tmp_path / "run", "coop", *extra(world, tmp_path))
    before = sorted(os.listdir(tmp_path))
    assert fragment in message_of(lambda: train.main(args), capsys)
    assert sorted(os.listdir(tmp_path)) == before  # nothing made


@pytest.mark.whole_registry
def test_help_lists_every_method(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes
    assert e.value.code == 0
    for name, module in prompts.METHODS.items():  # a line each, naming its options
        heading = module.__doc__.strip().split("\n")[0].split(" (")[0].rstrip(".")
        assert re.search(rf"\b{name} +{re.escape(heading)}", text), name
        assert all(f"--{key}" in text for key in module.DEFAULTS), name
    text = ""
    for name, module in prompts.METHODS.items():  # each option's help under --method NAME --help
        with pytest.raises(SystemExit):
            train.main(["--method", name, "--help"])
        own = " ".join(capsys.readouterr().out.split())
        helps = {**OPTION_HELP, **module.HELP}
        assert f"--method {name}" in own
        for key in module.DEFAULTS:
            assert helps[key].split()[0] in own and f"--{key}" in own, key
        text += own
    assert (
        "--fusion feature|logit" in text
        and "(default: every)" in text
        and "(default: 0.0035; > 0 and <= 10)" in text
    )
    assert (
        "seeds 1, 2, 3) (default: 1; between 0 and 4294967295)" in text
        and "(default: 7 7 6; between 0 and 10000)" in text
        and "(default: yes)" in text
    )
    with pytest.raises(SystemExit):
        train.main(["--method", "pmpo", "--help"])
    text = capsys.readouterr().out
    assert "--n_prompts" in text and "--stage_epochs" not in text and "--method coop" not in text


@pytest.mark.whole_registry
def test_every_option_has_help_and_its_choices_are_its_own():
    for module in [options, *prompts.METHODS.values()]:
        # shared help + own
        helps = module.HELP if module is options else {**OPTION_HELP, **module.HELP}
        assert set(module.DEFAULTS) <= set(helps), module.__name__
        assert set(module.HELP) <= set(module.DEFAULTS), module.__name__
        assert set(module.CHOICES) <= set(module.DEFAULTS), module.__name__
        for key, allowed in module.CHOICES.items():
            if isinstance(allowed, tuple):
                assert module.DEFAULTS[key] in allowed, key


def test_dash_and_underscore_flags_are_one(world, tmp_path):
    a = options.parse_args(argv(world, tmp_path, "pmpo", "--n-prompts", "2", "--eval-batch-size=7"))
    assert (a["n_prompts"], a["eval_batch_size"]) == (2, 7)


@pytest.fixture(scope="module")
def finished_run(world, reference):
    return reference["coop"].out


BAD_EVAL_ARGS = [  # (function(world, run folder, tmp_path) -> argv, fragment)
    (lambda w, r,
     t: ["--ckpt", f"{r}/prompt_learner.pt", "--dataset", "caltech101", "--device", "cuda"],
     "no CUDA GPU"),
    (lambda w, r,
     t: ["--ckpt", f"{r}/prompt_learner.pt", "--dataset", "caltech101", "--workers", "-2"],
     "--workers must be >= 0"),
    (lambda w, r,
     t: ["--ckpt", f"{r}/prompt_learner.pt", "--dataset", "caltech101", "--eval-batch-size", "0"],
     "--eval_batch_size must be >= 1"),
    (lambda w, r,
     t: ["--ckpt", f"{r}/prompt_learner.pt", "--dataset", "caltech101", "--precision", "fp16"],
     "fp16 needs a CUDA device"),
    (lambda w, r,
     t: ["--ckpt", f"{r}/prompt_learner.pt", "--dataset", "caltech101", "--subsample", "novel"],
     "invalid choice"),
    (lambda w, r,
     t: ["--ckpt", f"{r}/prompt_learner.pt", "--dataset", "caltech101", "--out", str(t)], "exists"),
    (lambda w, r, t: ["--ckpt", f"{r}/prompt_learner.pt", "--dataset", "caltech101",
                      "--out", os.path.join(write_file(t / "f", b"x"), "e.json")], "is a file"),
    (lambda w, r, t: ["--ckpt", f"{r}/config.json", "--dataset", "caltech101"],
     "could not be read"),
    (lambda w, r, t: ["--ckpt", nan_checkpoint(r, t), "--dataset", "caltech101"], "NaN"),
    (lambda w, r, t: ["--method", "zeroshot", "--dataset", "caltech101", "--model", nan_clip(w, t)],
     "NaN"),
    (lambda w, r,
     t: ["--ckpt", f"{r}/prompt_learner.pt", "--dataset", "caltech101", "--subsample", "new",
                      "--root", one_class_data(w, t)], "no test images"),
]


def nan_checkpoint(run, tmp_path):
    ckpt = load_ckpt(run)
    ckpt["state_dict"]["prompt_learner.ctx"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan_ckpt.pt")
    return str(tmp_path / "nan_ckpt.pt")


@pytest.mark.parametrize("case", range(len(BAD_EVAL_ARGS)))
def test_bad_eval_value(world, finished_run, tmp_path, capsys, case):
    make, fragment = BAD_EVAL_ARGS[case]
    args = make(world, finished_run, tmp_path)
    before = sorted(os.listdir(finished_run))
    args = args + ["--root", world.root] if "--root" not in args else args
    assert fragment in message_of(lambda: eval_py.main(args + ["--workers",
                                                               "0"] * ("--workers" not in args)),
                                                               capsys)
    assert sorted(os.listdir(finished_run)) == before


# -- kills and full disks at every write -----------------------------------------------------------

class FullDisk:
    """A file whose every write fails as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def inject(mp, kind, at):
    """Fail the at-th atomic write (1-based): killed while writing, killed before the
    rename, or a full disk."""
    count = [0]
    real_fdopen, real_replace = os.fdopen, os.replace

    def fdopen(fd, *args, **kwargs):  # atomic_write opens its temporary file with os.fdopen
        count[0] += 1
        f = real_fdopen(fd, *args, **kwargs)
        if count[0] == at and kind == "full disk":
            return FullDisk(f)
        if count[0] == at and kind == "killed while writing":
            f.write(b"partial" if "b" in (args[0] if args else "") else "partial")
            raise Killed
        return f

    def replace(src, dst):
        if count[0] == at and kind == "killed before rename":
            raise Killed
        return real_replace(src, dst)

    mp.setattr(os, "fdopen", fdopen)
    mp.setattr(os, "replace", replace)


def files_are_whole(out):
    """Every file of the folder reads back (JSON parses, checkpoints load), and no
    temporary name is left."""
    for name in os.listdir(out):
        path = os.path.join(out, name)
        assert not name.endswith(".tmp"), name
        if name.endswith(".json"):
            with open(path) as f:
                json.load(f)
        elif name.endswith(".pt"):
            torch.load(path, weights_only=True)


FAULTS = [(method, kind, at) for method, writes in (("coop", 8), ("aple", 10))
          for kind in ("killed while writing", "killed before rename",
                       "full disk") for at in range(1, writes + 1)]


@pytest.mark.parametrize("method, kind, at", FAULTS)
def test_fault_at_a_write(world, reference, tmp_path, capsys, method, kind, at):
    ref = reference[method]
    # every write of the run is covered
    assert len(ref.writes) == max(a for m, _, a in FAULTS if m == method)
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        inject(mp, kind, at)
        if kind == "full disk":
            assert "No space left on device" in message_of(lambda: train.main(argv(world, out,
                                                                                   method)), capsys)
        else:
            with pytest.raises(Killed):
                train.main(argv(world, out, method))
    files_are_whole(out)
    epochs_saved = ref.writes[:at - 1].count("train_state.pt")
    if os.path.exists(out / "train_state.pt"):
        assert torch.load(out / "train_state.pt",
                          weights_only=True)["done"].__len__() == epochs_saved
    (out / ".prompt_learner.pt.x1y2.tmp").write_bytes(b"what a kill -9 leaves")
    train.main(argv(world, out, method))  # the same command resumes
    same_run(out, ref.out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref.out))
    log = (out / "log.txt").read_text()
    # only the interrupted epoch is redone
    assert (f"after {epochs_saved} epochs" in log) == (epochs_saved > 0)


@pytest.mark.parametrize("kind", ["killed while writing", "killed before rename", "full disk"])
def test_fault_at_an_eval_write(world, finished_run, tmp_path, capsys, kind):
    out = tmp_path / "e.json"
    args = ["--ckpt", f"{finished_run}/prompt_learner.pt", "--dataset", "caltech101", "--root",
            world.root, "--workers", "0", "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        inject(mp, kind, 1)
        if kind == "full disk":
            assert "No space left on device" in message_of(lambda: eval_py.main(args), capsys)
        else:
            with pytest.raises(Killed):
                eval_py.main(args)
    assert os.listdir(tmp_path) == []  # no half-written result
    assert eval_py.main(args)["accuracy"] == json.loads(out.read_text())["accuracy"]


def test_read_only_out(world, tmp_path, capsys, monkeypatch):
    """Root may write anywhere, so a read-only folder is simulated where the check asks."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    text = message_of(lambda: train.main(argv(world, tmp_path / "run")), capsys)
    assert "cannot be written (read-only?)" in text and not (tmp_path / "run").exists()


# -- hostile files in the data set and in the run folder -------------------------------------------

def test_damaged_config_is_restored_from_the_checkpoint(world, reference, tmp_path):
    out = tmp_path / "run"
    interrupted(world, out)
    (out / "config.json").write_bytes(b"")
    train.main(argv(world, out))
    same_run(out, reference["coop"].out)


def test_damaged_metrics_means_evaluate_again(world, reference, tmp_path):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        # metrics.json is the last write
        inject(mp, "killed before rename", len(reference["coop"].writes))
        with pytest.raises(Killed):
            train.main(argv(world, out))
    (out / "metrics.json").write_bytes(b"")  # as an older, non-atomic version left it
    train.main(argv(world, out))
    same_run(out, reference["coop"].out)


def halve(path):
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def test_damaged_fewshot_json_is_named(world, reference, tmp_path, capsys):
    out = tmp_path / "run"
    interrupted(world, out)
    halve(out / "fewshot.json")
    text = message_of(lambda: train.main(argv(world, out)), capsys)
    assert f"{out / 'fewshot.json'} is damaged" in text and "Delete that file" in text
    os.remove(out / "fewshot.json")  # what the message says to do: the same draw again
    train.main(argv(world, out))
    assert "resuming" in (out / "log.txt").read_text()
    same_run(out, reference["coop"].out)


def test_damaged_train_state_costs_only_the_interrupted_epoch(world, reference, tmp_path):
    """It goes on from prompt_learner.pt (the last epoch's prompts), saying that its SGD
    momentum and random stream start afresh; then with the checkpoint damaged too, a
    message says what to delete."""
    out = tmp_path / "run"
    interrupted(world, out, "aple", epochs=2)
    halve(out / "train_state.pt")
    train.main(argv(world, out, "aple"))
    log = (out / "log.txt").read_text()
    assert "train_state.pt is damaged" in log and "after 2 epochs" in log
    assert (
        log.count("stage language epoch")
        + log.count("stage vision epoch")
        + log.count("stage joint epoch")
        == 3
    )
    # three epochs in all: the first two were kept, only the third ran again
    resumed = load_ckpt(out)
    assert resumed["epoch"] == 3 and all(t.isfinite().all() for t in resumed["state_dict"].values())


def test_damaged_train_state_and_checkpoint_are_named(world, reference, tmp_path, capsys):
    out = tmp_path / "run"
    interrupted(world, out)
    halve(out / "train_state.pt")
    halve(out / "prompt_learner.pt")
    text = message_of(lambda: train.main(argv(world, out)), capsys)
    assert "train_state.pt is damaged" in text and "prompt_learner.pt cannot be read" in text
    os.remove(out / "train_state.pt")
    os.remove(out / "prompt_learner.pt")
    train.main(argv(world, out))
    same_run(out, reference["coop"].out)


def test_a_run_stopped_in_its_first_epoch_is_not_in_the_way(world, reference, tmp_path, capsys):
    """It holds no trained epoch, so the corrected command (other settings) starts it over."""
    out = tmp_path / "run"
    real = torch.optim.SGD.step

    def step(self, *args, **kwargs):  # a too-high lr, as the option checks no longer allow one
        result = real(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.SGD, "step", step)
        text = message_of(lambda: train.main(argv(world, out, "coop", "--warmup_lr", "10")),
                          capsys)
    assert (
        "nan" in text
        and "no epoch had finished" in text
        and not (out / "prompt_learner.pt").exists()
    )
    train.main(argv(world, out))
    same_run(out, reference["coop"].out)
    assert (out / "fewshot.json").read_bytes() == (
        reference["coop"].out / "fewshot.json"
    ).read_bytes()


def test_nan_in_train_state(world, tmp_path, capsys):
    out = tmp_path / "run"
    interrupted(world, out)
    state = torch.load(out / "train_state.pt", weights_only=True)
    state["learned"]["prompt_learner.ctx"][0, 0] = float("inf")
    torch.save(state, out / "train_state.pt")
    assert "train_state.pt: NaN or infinite" in message_of(lambda: train.main(argv(world, out)),
                                                           capsys)


def test_nan_weights_after_a_step(world, tmp_path, capsys, monkeypatch):
    """A step that leaves NaN in the prompts with a finite loss stops the run; the last
    checkpoint stays good."""
    real, steps = torch.optim.SGD.step, []

    def step(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 4:  # epoch 2 (2 steps an epoch)
            self.param_groups[0]["params"][0].data[0, 0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    out = tmp_path / "run"
    text = message_of(lambda: train.main(argv(world, out)), capsys)
    assert "NaN or infinite" in text and str(out) in text
    assert load_ckpt(out)["epoch"] == 1 and not (out / "metrics.json").exists()
    assert all(t.isfinite().all() for t in load_ckpt(out)["state_dict"].values())


def copy_data(world, tmp_path):
    return shutil.copytree(world.root, tmp_path / "data")


def test_resume_trains_on_the_recorded_shots(world, reference, tmp_path, capsys):
    """The data set gains images between the kill and the resume: the run goes on
    with its fewshot.json."""
    root = copy_data(world, tmp_path)
    out = tmp_path / "run"
    interrupted(world, out, root=str(root))
    split_path = root / "caltech-101" / "split_zhou_Caltech101.json"
    split = json.loads(split_path.read_text())
    split["train"] = list(reversed(split["train"]))  # another order: another draw for the same seed
    split_path.write_text(json.dumps(split))
    assert data.fewshot_split(data.build_dataset("caltech101", str(root)).train, [], 2, 1)[0] != \
        data.fewshot_split(data.build_dataset("caltech101", world.root).train, [], 2, 1)[0]
    train.main(argv(world, out, root=str(root)))
    assert "training on the shots recorded" in capsys.readouterr().out
    same_run(out, reference["coop"].out)


def test_resume_refuses_changed_classes(world, tmp_path, capsys):
    root = copy_data(world, tmp_path)
    out = tmp_path / "run"
    interrupted(world, out, root=str(root))
    split_path = root / "caltech-101" / "split_zhou_Caltech101.json"
    split = json.loads(split_path.read_text())
    for key in split:
        split[key] = [[p, l, "wolf" if n == "dog" else n] for p, l, n in split[key]]
    split_path.write_text(json.dumps(split))
    text = message_of(lambda: train.main(argv(world, out, root=str(root))), capsys)
    assert "the data set changed" in text and "'dog'" in text


def bomb_png():
    """The header of a 40,000 x 40,000 PNG (1.6 billion pixels): PIL refuses it
    as a decompression bomb."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I",
                                                                        zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR",
                                        struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def damage_test_image(root, how):
    """Replace a novel-class test image (read only after training); returns its path and content."""
    path = os.path.join(root, "caltech-101", "101_ObjectCategories", "bird", "test_001.jpg")
    content = open(path, "rb").read()
    write_file(path,
               {"truncated": content[: len(content) // 3], "not an image": b"<html>", "empty": b"",
                      "decompression bomb": bomb_png()}[how])
    return path, content


@pytest.mark.parametrize("how, workers", [("truncated", "0"), ("not an image", "0"), ("empty", "1"),
                                          ("decompression bomb", "0")])
def test_bad_test_image_after_training(world, reference, tmp_path, capsys, how, workers):
    """Found after training: a message naming the image; once it is fixed, the
    same command evaluates."""
    root = str(copy_data(world, tmp_path))
    out = tmp_path / "run"
    path, content = damage_test_image(root, how)
    args = argv(world, out, "coop", "--workers", workers, root=root)
    text = message_of(lambda: train.main(args), capsys)
    assert "cannot read image" in text and os.path.basename(path) in text
    assert "Original Traceback" not in text and not (out / "metrics.json").exists()
    write_file(path, content)
    capsys.readouterr()
    train.main(args)
    log = (out / "log.txt").read_text()
    # trained once; the second run went straight to evaluation
    assert log.count("stage all epoch") == 2
    same_run(out, reference["coop"].out)


def test_sixteen_bit_png(tmp_path):
    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    rgb = np.asarray(data.load_image(str(tmp_path / "g.png")))
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[..., 0], np.round(grey / 257).astype(np.uint8))


def test_duplicate_class_names_are_warned_about(world, tmp_path):
    folder = synthetic.write_folder(tmp_path / "pets", ["Cat", "cat", "sea_lion", "sea lion"],
                                    per_class=4)
    out = tmp_path / "run"
    train.main(["--method", "coop", "--dataset", f"folder:{folder}", "--model", world.model,
                "--out", str(out), "--workers", "0", "--shots", "1", "--epochs", "1", "--protocol",
                "fewshot"])
    log = (out / "log.txt").read_text()
    assert (
        "cannot tell these classes apart" in log
        and "Cat, cat" in log
        and "sea lion, sea_lion" in log
    )
    assert data.duplicate_classnames(data.build_dataset("caltech101", world.root).test) == []


LOCK_HOLDER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, os.getcwd())
    import runfolder
    runfolder.make_run_folder(sys.argv[1])  # as train.py and the benchmark take a folder
    runfolder.lock_run_folder(sys.argv[1])
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_process_is_refused_and_a_killed_one_leaves_no_lock(world, reference, tmp_path,
                                                                   capsys):
    out = tmp_path / "run"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], cwd=repo,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        text = message_of(lambda: train.main(argv(world, out)), capsys)
        assert f"another process (pid {holder.pid}) is running in {out}" in text
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train.main(argv(world, out))  # the lock died with its process
    same_run(out, reference["coop"].out)


def test_kill_9_of_a_real_process(world, tmp_path):
    """train.py as its own process, killed with SIGKILL once an epoch is logged; the same
    command resumes to the uninterrupted run's prompts (whatever it was doing: the kill
    lands where it lands)."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    train.main(argv(world, ref, "coop", "--epochs", "4"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen([sys.executable, "train.py",
                                *argv(world, out, "coop", "--epochs", "4")], cwd=repo,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None and "epoch 1/4" not in ((out / "log.txt").read_text()
                                                             if (out / "log.txt").exists() else ""):
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (out / "metrics.json").exists()  # killed before it finished
    train.main(argv(world, out, "coop", "--epochs", "4"))
    same_run(out, ref)


# -- eval.py --summary -----------------------------------------------------------------------------

def test_summary_splits_tables_by_what_the_user_changed(world, reference, tmp_path, capsys):
    """Seeds share a table; a flag the protocol does not set (here --lr) splits it, and the title
    names every setting the runs changed from the protocol's."""
    runs = tmp_path / "runs"
    for name, extra in (("s1", []), ("s2", ["--seed", "2"]), ("lr", ["--lr", "0.01"])):
        train.main(argv(world, runs / name, "coop", *extra))
    (runs / "broken").mkdir()
    (runs / "broken" / "config.json").write_text((runs / "s1" / "config.json").read_text())
    (runs / "broken" / "metrics.json").write_bytes(b"")
    (runs / "s2" / "eval_imagenet_a_all.json").write_bytes(b"{")
    capsys.readouterr()
    eval_py.main(["--summary", str(runs)])
    text = capsys.readouterr().out
    tables = {"### " + block.splitlines()[0]: block for block in text.split("### ")[1:]}
    side = "### base-to-novel, 2 shots, caltech101: side by side"
    flags = f"batch_size 2, epochs 2, model {world.model!r}"  # argv's flags, beside the shots
    same, other = f"coop, {flags}", f"coop, batch_size 2, epochs 2, lr 0.01, model {world.model!r}"
    assert set(tables) == {f"### coop, base2novel, 2 shots, {flags}",
                           f"### {other.replace('coop,', 'coop, base2novel, 2 shots,')}", side}
    assert f"| {same} | 2 |" in tables[side] and f"| {other} | 1 |" in tables[side]
    assert "| caltech101 | 2 |" in tables[f"### coop, base2novel, 2 shots, {flags}"]
    assert f"skipped {runs / 'broken'}: {runs / 'broken' / 'metrics.json'} is damaged" in text
    assert f"skipped {runs / 's2' / 'eval_imagenet_a_all.json'}: damaged" in text
