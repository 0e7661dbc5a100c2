"""train.py and eval.py end to end: every protocol and method on a tiny CLIP and tiny data
sets written in their real layouts; what a run folder holds; frozen CLIP; determinism;
resume or refuse; bad input.

Runs are 1-3 epochs of a few 32 x 32 images, so a whole train.main call
takes a fraction of a second.
"""
import json
import math
import os
import random
import statistics
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as eval_py
import console
import runfolder
import tables
import train
from clip.tokenizer import tokenize
from clip.transform import Preprocess
import prompts
from prompts import coop
from tests import synthetic
from tests.synthetic import one_thread  # noqa: F401 (a fixture)
from tests.tiny import stage_count, tiny_clip, tiny_config, tiny_flags

pytestmark = pytest.mark.usefixtures("one_thread")

# base: cat, dog, fish; novel: bird, horse, frog
CLASSES = ["cat", "dog", "fish", "bird", "horse", "frog"]
BASE, NOVEL = CLASSES[:3], CLASSES[3:]
METHODS = tuple(prompts.METHODS)
EPOCHS = {m: max(2, stage_count(m)) for m in METHODS}  # at least one a stage: a run stays short
FAST = {m: tiny_flags(m, EPOCHS[m]) for m in METHODS}  # fit the tiny CLIP
RUN_FILES = [".run_folder", "config.json", "fewshot.json", "log.txt", "metrics.json",
             "prompt_learner.pt"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A caltech101 layout (6 classes; frog has a single training image), a tiny CLIP checkpoint."""
    tmp = tmp_path_factory.mktemp("world")
    root = synthetic.write_caltech101(str(tmp / "data"), CLASSES, train=4, val=2, test=3,
                                      fewer={"frog": 1})
    return SimpleNamespace(tmp=tmp, root=root, model=synthetic.save_tiny_clip(tmp / "tiny.pt"))


def argv(world, out, method="coop", *extra, dataset="caltech101", root=None):
    """train.py's command line for a short run; later flags in `extra` override earlier ones."""
    return ["--method", method, "--dataset", dataset, "--root", root or world.root, "--model",
            world.model, "--out", str(out), "--workers", "0", "--shots", "2", "--batch_size", "2",
            *FAST[method], *extra]


def evaluate(world, out, *args, root=None):
    return eval_py.main([*args, "--root", root or world.root, "--workers", "0", "--out", str(out)])


def learned_names(method):
    """The names of the tensors `method` learns, from the model: its parameters
    outside the frozen CLIP."""
    cfg = tiny_config(method)
    model = prompts.build(method, tiny_clip(), BASE, "a photo of a {}.", cfg)
    names = {n for n, p in model.named_parameters() if not n.startswith("clip.")}
    assert names and all(p.requires_grad for n, p in model.named_parameters() if n in names)
    return names


def load_ckpt(folder):
    return torch.load(os.path.join(folder, "prompt_learner.pt"), map_location="cpu",
                      weights_only=True)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def snapshot(folder):
    """{file: (bytes, mtime)} of a folder, to show that nothing in it was touched."""
    return {name: (read(os.path.join(folder, name)),
                   os.stat(os.path.join(folder, name)).st_mtime_ns)
            for name in sorted(os.listdir(folder))}


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def perturb_global_rng():
    """Draw from every global RNG, so a test shows a run's results depend only on its own --seed."""
    random.random(), np.random.rand(), torch.rand(3)


@pytest.fixture(scope="module")
def b2n(world):
    """One base-to-novel run per method, keeping a reference to the CLIP each run trained with."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        models = []

        def spy(name, device, load=train.load_frozen_clip):
            models.append(load(name, device))
            return models[-1]

        mp.setattr(train, "load_frozen_clip", spy)
        for method in METHODS:
            out = world.tmp / "b2n" / method
            perturb_global_rng()
            metrics = train.main(argv(world, out, method))
            runs[method] = SimpleNamespace(out=str(out), metrics=metrics, clip=models[-1])
    return runs


# -- protocols -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_base2novel(world, b2n, method, tmp_path):
    run = b2n[method]
    with open(os.path.join(run.out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics == run.metrics
    assert set(metrics) == {"base_acc", "novel_acc", "hm"}
    base, novel = metrics["base_acc"], metrics["novel_acc"]
    assert all(0 <= v <= 100 for v in metrics.values())
    assert metrics["hm"] == pytest.approx(
        2 * base * novel / (base + novel) if base + novel else 0.0
    )
    # eval.py on the checkpoint gives the same numbers: the checkpoint holds
    # everything the run evaluated
    ckpt = os.path.join(run.out, "prompt_learner.pt")
    for subsample, key, names in (("base", "base_acc", BASE), ("new", "novel_acc", NOVEL)):
        result = evaluate(world, tmp_path / f"{subsample}.json", "--ckpt", ckpt, "--dataset",
                          "caltech101", "--subsample", subsample)
        assert (result["method"], result["classes"], result["images"]) == (method, len(names),
                                                                           3 * len(names))
        assert result["accuracy"] == metrics[key], subsample


def test_fewshot_protocol(world, tmp_path):
    out = tmp_path / "run"
    metrics = train.main(argv(world, out, "coop", "--protocol", "fewshot"))
    assert set(metrics) == {"accuracy"}
    ckpt = load_ckpt(out)
    assert ckpt["classnames"] == CLASSES and ckpt["config"]["protocol"] == "fewshot"
    result = evaluate(world, tmp_path / "eval.json", "--ckpt", str(out / "prompt_learner.pt"),
                      "--dataset", "caltech101")
    assert (result["classes"], result["images"]) == (6, 18)
    assert result["accuracy"] == metrics["accuracy"]


@pytest.mark.parametrize("method", METHODS)
def test_gpu_fast_path_on_cpu(world, b2n, method, tmp_path):
    """What a GPU run switches on (bf16 autocast, crops resized by torch, text
    checkpointing), run on the CPU: every method trains and evaluates, and learns what the
    float32 run learns, to bf16 rounding."""
    out = tmp_path / "fast"
    train.main(argv(world, out, method, "--precision", "bf16", "--augment_on_device", "on",
                    "--text_checkpointing", "on"))
    train.main(argv(world, tmp_path / "init", method, *tiny_flags(method, 0)))
    fast, ref, init = (load_ckpt(folder)["state_dict"] for folder in (out, b2n[method].out,
                                                                      tmp_path / "init"))
    assert fast.keys() == ref.keys()
    # autocast computes in bf16; prompts stay float32
    assert all(t.dtype == torch.float32 for t in fast.values())
    # what training moved
    update = lambda state: torch.cat([(state[k] - init[k]).flatten() for k in sorted(init)])
    cos = torch.nn.functional.cosine_similarity(update(fast), update(ref), dim=0)
    assert cos > 0.99, cos  # measured 0.9997 (aple) to 0.9999 (coop)


IMAGENET = ["goldfish", "tabby cat", "red fox", "sea lion"]


@pytest.mark.parametrize("method", METHODS)
def test_crossdataset(world, tmp_path, method, capsys):
    """Train on all classes of an ImageNet layout, evaluate on ImageNet-A,
    ImageNetV2 and a folder."""
    root = str(tmp_path / "data")
    synthetic.write_imagenet(root, IMAGENET, train=3, val=2)
    synthetic.write_imagenet_a(root, labels=[1, 3], n=3)
    synthetic.write_imagenetv2(root, n_classes=len(IMAGENET), n=2)
    folder = synthetic.write_folder(tmp_path / "pets", ["hamster", "parrot", "golden_retriever"],
                                    per_class=4)
    out = tmp_path / "run"
    metrics = train.main(argv(world, out, method, "--protocol", "crossdataset", dataset="imagenet",
                              root=root))
    assert set(metrics) == {"accuracy"}
    assert load_ckpt(out)["classnames"] == IMAGENET
    ckpt = str(out / "prompt_learner.pt")
    for dataset, classes, images in (("imagenet_a", 2, 6), ("imagenetv2", 4, 8),
                                     (f"folder:{folder}", 3, 3)):
        result_path = tmp_path / f"eval_{dataset.split('/')[-1]}.json"
        result = evaluate(world, result_path, "--ckpt", ckpt, "--dataset", dataset, root=root)
        assert (result["method"], result["dataset"]) == (method, dataset)
        assert (result["classes"], result["images"]) == (classes, images), dataset
        assert 0 <= result["accuracy"] <= 100
        with open(result_path) as f:
            assert json.load(f) == result
    with pytest.raises(SystemExit, match="exists"):  # a result is never overwritten
        evaluate(world, result_path, "--ckpt", ckpt, "--dataset", dataset, root=root)
    # by default the result goes next to the checkpoint, and the summary
    # table picks it up as a column
    result = eval_py.main(["--ckpt", ckpt, "--dataset", "imagenet_a", "--root", root, "--workers",
                           "0"])
    assert os.path.isfile(out / "eval_imagenet_a_all.json")
    table = summary(capsys, out).strip()
    assert f"### {method}, crossdataset, 2 shots" in table and "imagenet_a (all)" in table
    row = next(line for line in table.splitlines() if line.startswith("| imagenet |"))
    assert f"{result['accuracy']:.2f}" in row  # the paper's row and the difference follow it


def test_zeroshot_eval(world, tmp_path):
    """eval.py --method zeroshot equals CLIP's recipe written out here: template
    features, argmax of cosine."""
    result = evaluate(world, tmp_path / "zs.json", "--method", "zeroshot", "--dataset",
                      "caltech101", "--subsample", "base", "--model", world.model)
    assert (result["method"], result["classes"], result["images"]) == ("zeroshot", 3, 9)
    model = train.load_frozen_clip(world.model, "cpu")
    with open(os.path.join(world.root, "caltech-101", "split_zhou_Caltech101.json")) as f:
        test = [(rel, label) for rel, label, _ in json.load(f)["test"] if label < 3]
    image_dir = os.path.join(world.root, "caltech-101", "101_ObjectCategories")
    with torch.no_grad():
        text = model.encode_text(tokenize([f"a photo of a {name}." for name in BASE]))
        images = torch.stack([Preprocess(32)(Image.open(os.path.join(image_dir,
                                                                     rel))) for rel, _ in test])
        predicted = (model.encode_image(images) @ (text / text.norm(dim=-1,
                                                                    keepdim=True)).t()).argmax(-1)
    expected = 100.0 * sum(int(p) == label for p, (_, label) in zip(predicted, test)) / len(test)
    assert result["accuracy"] == pytest.approx(expected)


def test_zero_epochs_evaluate_the_initial_prompts(world, tmp_path):
    """CoOp starts from "a photo of a", so without training it is zero-shot CLIP; the run still
    finishes (metrics.json and a checkpoint, no train_state.pt left behind)."""
    out = tmp_path / "run"
    metrics = train.main(argv(world, out, "coop", "--epochs", "0"))
    zeroshot = {key: evaluate(world, tmp_path / f"zs_{subsample}.json", "--method", "zeroshot",
                              "--dataset", "caltech101", "--subsample", subsample, "--model",
                              world.model)["accuracy"]
                for subsample, key in (("base", "base_acc"), ("new", "novel_acc"))}
    assert {k: metrics[k] for k in zeroshot} == zeroshot
    assert sorted(os.listdir(out)) == RUN_FILES


def test_learning_rate_schedule(world, tmp_path):
    """Dassl's ConstantWarmupScheduler around CosineAnnealingLR(max_epoch) with WARMUP_RECOUNT=True
    (every CoOp/MaPLe/PromptSRC config): warmup_lr in epoch 1, then the cosine restarts from its
    first value, so epoch 2 trains at the full lr and epoch e (1-based, e >= 2) at lr * (1 + cos(pi
    * (e - 2) / epochs)) / 2."""
    epochs, lr = 4, 0.002
    out = tmp_path / "run"
    train.main(argv(world, out, "coop", "--epochs", str(epochs), "--lr", str(lr)))
    logged = [
        float(line.split(" lr ")[1].split()[0])
        for line in (out / "log.txt").read_text().splitlines()
        if line.startswith("stage all epoch")
    ]
    expected = [1e-5] + [
        lr * 0.5 * (1 + math.cos(math.pi * (e - 1) / epochs)) for e in range(1, epochs)
    ]
    assert logged == pytest.approx(expected, rel=1e-2)


# -- the run folder --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_run_folder(b2n, method):
    out = b2n[method].out
    # train_state.pt is removed once the run is complete
    assert sorted(os.listdir(out)) == RUN_FILES
    # the tiny CLIP alone is ~14 MB
    assert os.path.getsize(os.path.join(out, "prompt_learner.pt")) < 1_000_000
    ckpt = load_ckpt(out)  # weights_only=True: plain tensors and containers
    # exactly what the method learns, no CLIP
    assert set(ckpt["state_dict"]) == learned_names(method)
    assert not any(k.startswith("clip.") for k in ckpt["state_dict"])
    assert (ckpt["method"], ckpt["classnames"]) == (method, BASE)
    assert ckpt["epoch"] == EPOCHS[method]
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert ckpt["config"] == config
    assert (config["method"], config["dataset"], config["protocol"], config["shots"],
            config["seed"]) == \
        (method, "caltech101", "base2novel", 2, 1)
    with open(os.path.join(out, "fewshot.json")) as f:
        fewshot = json.load(f)
    per_class = {name: sum(row[2] == name for row in fewshot["train"]) for name in CLASSES}
    assert per_class == {**{name: 2 for name in CLASSES}, "frog": 1}
    assert all(sum(row[2] == name for row in fewshot["val"]) == 2 for name in CLASSES)
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert "trainable parameters:" in log and "results:" in log


def test_short_classes_are_reported(b2n):
    with open(os.path.join(b2n["coop"].out, "log.txt")) as f:
        log = f.read()
    assert "fewer than --shots 2" in log and "frog (1)" in log
    assert "cat (" not in log


@pytest.mark.parametrize("method", METHODS)
def test_clip_is_bit_identical_after_training(world, b2n, method):
    loaded = torch.load(world.model, weights_only=True)
    used = b2n[method].clip
    assert_same_tensors(used.state_dict(), loaded)
    assert not any(p.requires_grad for p in used.parameters())


# -- determinism -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeds(world):
    """Seeds 1 and 2 side by side (for the summary), and seed 1 again in another folder."""
    out = SimpleNamespace(s1=world.tmp / "seeds" / "s1", s2=world.tmp / "seeds" / "s2",
                          again=world.tmp / "again")
    for folder, seed in ((out.s1, 1), (out.s2, 2), (out.again, 1)):
        perturb_global_rng()
        train.main(argv(world, folder, "coop", "--seed", str(seed)))
    return out


def test_same_seed_same_run(seeds):
    for name in ("metrics.json", "fewshot.json", "config.json"):
        assert read(seeds.s1 / name) == read(seeds.again / name), name
    a, b = load_ckpt(seeds.s1), load_ckpt(seeds.again)
    assert_same_tensors(a["state_dict"], b["state_dict"])
    assert {k: v for k, v in a.items() if k != "state_dict"} == {
        k: v for k, v in b.items() if k != "state_dict"
    }


def test_speed_switches(world, seeds, tmp_path):
    """--text_checkpointing on changes nothing; --augment_on_device on (torch's resize, here on the
    CPU) changes the pixels by rounding only, so the run learns nearly the same prompts."""
    out = tmp_path / "ckpt"
    train.main(argv(world, out, "coop", "--seed", "1", "--text_checkpointing", "on"))
    assert "with activation checkpointing" in read(out / "log.txt").decode()
    assert read(out / "metrics.json") == read(seeds.s1 / "metrics.json")
    assert_same_tensors(load_ckpt(out)["state_dict"], load_ckpt(seeds.s1)["state_dict"])
    out = tmp_path / "device"
    train.main(argv(world, out, "coop", "--seed", "1", "--augment_on_device", "on"))
    assert "crops resized on cpu" in read(out / "log.txt").decode()
    train.main(argv(world, tmp_path / "init", "coop", "--seed", "1", "--epochs", "0"))
    ctx, ref, init = (load_ckpt(folder)["state_dict"]["prompt_learner.ctx"].flatten()
                      for folder in (out, seeds.s1, tmp_path / "init"))
    assert not torch.equal(ctx, ref)
    cos = torch.nn.functional.cosine_similarity(ctx - init, ref - init, dim=0)  # the two updates
    assert cos > 0.999, cos  # measured 1.00000


def test_other_seed_other_shots(seeds):
    assert read(seeds.s1 / "fewshot.json") != read(seeds.s2 / "fewshot.json")
    assert not torch.equal(load_ckpt(seeds.s1)["state_dict"]["prompt_learner.ctx"],
                           load_ckpt(seeds.s2)["state_dict"]["prompt_learner.ctx"])


def summary(capsys, folder):
    """eval.py --summary FOLDER: the Markdown it prints (or returns)."""
    capsys.readouterr()
    returned = eval_py.main(["--summary", str(folder)])
    return capsys.readouterr().out + (returned if isinstance(returned, str) else "")


def test_summary(seeds, capsys):
    metrics = [json.loads(read(folder / "metrics.json")) for folder in (seeds.s1, seeds.s2)]
    lines = summary(capsys, seeds.s1.parent).splitlines()
    # the title names the flags the runs changed (model, batch_size, epochs) after the K
    assert any(line.startswith("### coop, base2novel, 2 shots, ") for line in lines)
    header = next(line for line in lines if line.startswith("| data set"))
    row = next(line for line in lines if line.startswith("| caltech101 "))
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")],
                     [c.strip() for c in row.strip("|").split("|")]))
    assert cells["seeds"] == "2"  # s1 and s2; not the repeat of seed 1 outside the folder
    means = {}
    for key in ("base_acc", "novel_acc"):
        values = [m[key] for m in metrics]
        means[key] = statistics.mean(values)
        assert cells[key] == f"{means[key]:.2f} ± {statistics.stdev(values):.2f}"
    assert cells["HM"] == f"{tables.harmonic_mean(means['base_acc'], means['novel_acc']):.2f}"


# -- resume or refuse ------------------------------------------------------------------------------

def test_finished_folder_is_refused_and_untouched(world, seeds):
    before = snapshot(seeds.s1)
    with pytest.raises(SystemExit) as e:
        train.main(argv(world, seeds.s1, "coop", "--seed", "1"))
    assert str(seeds.s1) in str(e.value)
    assert snapshot(seeds.s1) == before


def test_foreign_folder_is_refused(world, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        train.main(argv(world, out, "coop"))
    assert str(out) in str(e.value)
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


class Crash(Exception):
    """Stands for a killed process."""


def crash_at_epoch_start(monkeypatch, n):
    """Make train.py die when its n-th epoch (counted over all stages) starts."""
    real, calls = train.lr_at, []

    def lr_at(epoch, *args):  # args: epochs, cfg and the method's lr shape
        calls.append(epoch)
        if len(calls) == n:
            raise Crash
        return real(epoch, *args)

    monkeypatch.setattr(train, "lr_at", lr_at)


@pytest.mark.parametrize("method", METHODS)
def test_resume(world, b2n, tmp_path, method):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        crash_at_epoch_start(mp, 2)  # APLe: at the start of its second stage
        with pytest.raises(Crash):
            train.main(argv(world, out, method))
    assert not (out / "metrics.json").exists()
    assert load_ckpt(out)["epoch"] == 1
    # other settings: refused, folder untouched
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        train.main(argv(world, out, method, "--lr", "0.5"))
    assert str(out) in str(e.value) and "lr" in str(e.value)
    assert snapshot(out) == before
    # same settings: resumes, and ends exactly where the uninterrupted run of the b2n fixture ended
    perturb_global_rng()
    metrics = train.main(argv(world, out, method))
    assert "resuming" in (out / "log.txt").read_text()
    assert sorted(os.listdir(out)) == RUN_FILES
    assert metrics == b2n[method].metrics
    resumed, uninterrupted = load_ckpt(out), load_ckpt(b2n[method].out)
    assert_same_tensors(resumed["state_dict"], uninterrupted["state_dict"])
    assert resumed["epoch"] == uninterrupted["epoch"]


def test_fewshot_file(world, seeds, tmp_path, monkeypatch):
    """--fewshot-file trains on the items of the file, whatever --seed says."""
    trained_on = []

    class SpyTrainSet(data.TrainSet):
        def __init__(self, items, *args, **kwargs):
            trained_on.extend(items)
            super().__init__(items, *args, **kwargs)

    monkeypatch.setattr(data, "TrainSet", SpyTrainSet)
    given = seeds.s1 / "fewshot.json"
    out = tmp_path / "run"
    train.main(argv(world, out, "coop", "--seed", "2", "--fewshot-file", str(given)))
    assert read(out / "fewshot.json") == read(given)
    # seed 2 alone draws others
    assert read(out / "fewshot.json") != read(seeds.s2 / "fewshot.json")
    image_dir = os.path.join(world.root, "caltech-101", "101_ObjectCategories")
    rows = json.loads(read(given))["train"]
    # base classes
    expected = [(os.path.join(image_dir, rel), label) for rel, label, _ in rows if label < 3]
    assert [(item.impath, item.label) for item in trained_on] == expected


def test_fewshot_file_sets_the_recorded_shots(world, seeds, tmp_path):
    """A 2-shot fewshot.json without --shots: config.json (and so the summary table, the checkpoint
    and the log) must not claim the default 16 shots, nor warn that every class is short of 16."""
    args = argv(world, tmp_path / "run", "coop", "--fewshot-file", str(seeds.s1 / "fewshot.json"))
    del args[args.index("--shots"):args.index("--shots") + 2]
    try:
        train.main(args)
    except SystemExit as e:  # refusing the mismatch is fine too, if it says why
        assert "shots" in str(e)
        return
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["shots"] == 2
    assert "fewer than --shots 16" not in (tmp_path / "run" / "log.txt").read_text()


# -- bad input: a message that says what is wrong --------------------------------------------------

def refused(call, *words):
    """call() must end with SystemExit or an exception whose message holds every word."""
    with pytest.raises((SystemExit, ValueError, RuntimeError, OSError)) as e:
        call()
    message = str(e.value)
    for word in words:
        assert word in message, message
    return message


def test_unknown_method(world, tmp_path):
    args = argv(world, tmp_path / "run", "coop")
    args[args.index("coop")] = "cocop"
    refused(lambda: train.main(args), "cocop", ", ".join(prompts.METHODS))
    assert not (tmp_path / "run").exists()


def test_unknown_protocol(world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(argv(world, tmp_path / "run", "coop", "--protocol", "zeroshot"))
    err = capsys.readouterr().err
    assert "--protocol" in err and "base2novel" in err and "'zeroshot'" in err
    assert not (tmp_path / "run").exists()


def test_bad_switch(world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(argv(world, tmp_path / "run", "coop", "--text_checkpointing", "yes"))
    assert "--text_checkpointing must be auto, on or off" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad, words", [
    (["--dataset", "caltech10"], ["unknown dataset", "caltech10"]),
    (["--dataset", "oxford_pets"], ["oxford_pets", "data.prepare"]),  # known, but not under --root
    (["--model", "/nonexistent/clip.pt"], ["/nonexistent/clip.pt"]),
    # more prompts than the 2 vision layers
    (["--method", "pmpo", "--n_prompts", "4"], ["n_prompts", "2"]),
])
def test_bad_input_leaves_no_run_folder(world, tmp_path, bad, words):
    """A typo ends with a message, and the corrected command then runs in the same --out (no
    half-made run folder "with other settings" is left in the way)."""
    out = tmp_path / "run"
    good = argv(world, out, bad[1] if bad[0] == "--method" else "coop")
    refused(lambda: train.main(good + bad), *words)
    assert not os.path.exists(out / "metrics.json")
    train.main(good)
    assert sorted(os.listdir(out)) == RUN_FILES


def test_eval_refuses_another_method(world, b2n, tmp_path):
    ckpt = os.path.join(b2n["pmpo"].out, "prompt_learner.pt")
    refused(lambda: evaluate(world, tmp_path / "e.json", "--ckpt", ckpt, "--method", "coop",
                             "--dataset", "caltech101"),
            "pmpo", "coop")
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("other",
                         [dict(transformer_width=128), dict(vision_layers=3), dict(embed_dim=32)])
def test_eval_refuses_another_clip(world, b2n, tmp_path, other):
    model = synthetic.save_tiny_clip(tmp_path / "other.pt", **other)
    ckpt = os.path.join(b2n["coop"].out, "prompt_learner.pt")
    refused(lambda: evaluate(world, tmp_path / "e.json", "--ckpt", ckpt, "--dataset", "caltech101",
                             "--model", model),
            "another CLIP")


def test_eval_refuses_another_class_list(world, b2n, tmp_path):
    """Same data set name and the subsample the prompts were trained on, but other
    classes (another split)."""
    root = synthetic.write_caltech101(str(tmp_path / "data"),
                                      ["cat", "dog", "whale", "bird", "horse", "frog"])
    ckpt = os.path.join(b2n["coop"].out, "prompt_learner.pt")
    refused(lambda: evaluate(world, tmp_path / "e.json", "--ckpt", ckpt, "--dataset", "caltech101",
                             "--subsample", "base", root=root), "classes")
    # other classes are what prompts are for: the novel half of that split evaluates
    assert evaluate(world, tmp_path / "new.json", "--ckpt", ckpt, "--dataset", "caltech101",
                    "--subsample", "new", root=root)["classes"] == 3


def test_eval_refuses_non_checkpoints(world, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    for path, words in ((world.model, ["not a prompt checkpoint", "--model"]),
                        (str(text), ["could not be read"]),
                        (str(tmp_path / "missing.pt"), ["no checkpoint"])):
        message = refused(lambda: evaluate(world, tmp_path / "e.json", "--ckpt", path, "--dataset",
                                           "caltech101"), *words)
        assert path in message


def test_shots_beyond_a_class(world, tmp_path, capsys):
    train.main(argv(world, tmp_path / "run", "coop", "--protocol", "fewshot", "--shots", "3"))
    for text in (capsys.readouterr().out, (tmp_path / "run" / "log.txt").read_text()):
        assert "fewer than --shots 3" in text and "frog (1)" in text


def assert_stopped_at_a_finite_loss(out, message, epoch):
    assert "loss" in message and "nan" in message.lower() and str(out) in message
    assert not (out / "metrics.json").exists()
    ckpt = load_ckpt(out)  # the last good epoch's prompts, loadable
    assert ckpt["epoch"] == epoch
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_nan_loss(world, tmp_path, monkeypatch):
    epoch = []
    real_lr_at, real_loss = train.lr_at, coop.CustomCLIP.loss
    monkeypatch.setattr(train, "lr_at", lambda e, *args: epoch.append(e) or real_lr_at(e, *args))
    monkeypatch.setattr(coop.CustomCLIP, "loss",
                        lambda self,
                        *args: real_loss(self, *args) * (float("nan") if len(epoch) >= 2 else 1.0))
    out = tmp_path / "run"
    message = refused(lambda: train.main(argv(world, out, "coop")))
    assert_stopped_at_a_finite_loss(out, message, epoch=1)


def test_nan_loss_from_a_huge_learning_rate(world, tmp_path, monkeypatch):
    """The guard behind the option checks (which now stop an lr above 10 first)."""
    monkeypatch.setitem(prompts.common.OPTION_CHOICES, "lr", prompts.common.Range(0, open_low=True))
    out = tmp_path / "run"
    message = refused(lambda: train.main(argv(world, out, "coop", "--epochs", "3", "--lr", "1e30")))
    assert_stopped_at_a_finite_loss(out, message, epoch=1)


@pytest.mark.parametrize("tty", [False, True])
def test_progress_line(monkeypatch, capsys, tty):
    """Step, images/s and ETA: a plain line a minute when stderr is a file, one line
    rewritten in place on a terminal (cleared at the end, the loop logs its own summary).
    Nothing goes to stdout or log.txt."""
    clock = iter([0.0, 30.0, 61.0, 61.1, 130.0])  # created, then after steps 1-4 of 4
    monkeypatch.setattr(console, "time", SimpleNamespace(time=lambda: next(clock)))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    progress = console.Progress("stage all epoch 1/5", 4)
    for step in range(1, 5):
        progress(step, 4)
    progress.close()
    out, err = capsys.readouterr()
    assert out == ""
    if tty:  # every step is more than 0.2 s after the last line, but for step 3 (0.1 s)
        lines = ["stage all epoch 1/5  step 1/4  0.1 img/s  ETA 1:30",
                 "stage all epoch 1/5  step 2/4  0.1 img/s  ETA 1:01",
                 "stage all epoch 1/5  step 4/4  0.1 img/s  ETA 0:00"]
        assert err == "".join(f"\r{line}\033[K" for line in lines) + "\r\033[K"
    else:  # a minute after the start, then the last step
        assert err == ("stage all epoch 1/5  step 2/4  0.1 img/s  ETA 1:01\n"
                       "stage all epoch 1/5  step 4/4  0.1 img/s  ETA 0:00\n")
