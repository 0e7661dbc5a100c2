"""Hostile data files and data sets: every kind of file data/ reads, damaged in every
way a hand edit or a half copy damages it, and the data set layouts whose labels can go wrong.

Each case ends in one of two ways: a SystemExit whose text names the file and what is wrong (never
a traceback, and no run folder left behind, since the data is read before the folder is made), or
the right result, said out loud where CoOp's protocol keeps something a user might not expect.
The damage is generated per kind of file (the tables below), not listed input by input.
"""
import json
import os
import shutil
import unicodedata
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import data
import train
from data.toy import stamp_of_world
from tests import synthetic
from tests.synthetic import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "fish", "bird"]
SPLIT = "caltech-101/split_zhou_Caltech101.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    root = synthetic.write_caltech101(str(tmp / "data"), CLASSES, train=2, val=1, test=1)
    imagenet = synthetic.write_imagenet(str(tmp / "imagenet_root"), CLASSES, train=1, val=1)
    return SimpleNamespace(tmp=tmp, root=root, imagenet=imagenet,
                           model=synthetic.save_tiny_clip(tmp / "tiny.pt"))


def write(path, text):
    with open(path, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)


def copy_of(src, tmp_path):
    dst = str(tmp_path / "data")
    shutil.copytree(src, dst)
    return dst


def run_argv(world, dataset, root, out, *extra):
    return ["--method", "coop", "--dataset", dataset, "--root", root, "--model", world.model,
            "--out", str(out), "--workers", "0", "--shots", "1", "--batch_size", "2",
            "--epochs", "1", *extra]


def outcome(call, capsys, path, fragment):
    """clear: SystemExit naming `path` and saying `fragment`; unclear: a SystemExit that does not;
    traceback: any other exception; silent: no error at all."""
    capsys.readouterr()
    try:
        call()
    except SystemExit as e:
        text = (e.code if isinstance(e.code, str) else "") + capsys.readouterr().err
        return "clear" if str(path) in text and fragment in text else f"unclear: {text}"
    except Exception as e:  # noqa: BLE001 (the point: any other exception is a failure)
        return f"traceback: {type(e).__name__}: {e}"
    return "silent"


def expect_clear(world, capsys, dataset, root, path, fragment, tmp_path, *extra):
    out = tmp_path / "run"
    got = outcome(lambda: train.main(run_argv(world, dataset, root, out, *extra)), capsys, path,
                  fragment)
    assert got == "clear", got
    assert not out.exists(), "a run folder was left behind"


# -- JSON rows: split files (CoOp's split_zhou_*.json, a folder's split.json) and fewshot.json ----

def first_row(key):
    def edit(content, value):
        content[key][0] = value(content[key][0])
        return json.dumps(content)
    return edit


def whole(value):
    return lambda content, _: value(content)


def relabel(content, old, new):
    for rows in content.values():
        for row in rows:
            row[1] = new if row[1] == old else row[1]
    return json.dumps(content)


def rename(content, old, new):
    for rows in content.values():
        for row in rows:
            row[2] = new if row[2] == old else row[2]
    return json.dumps(content)


# (case, text of the damaged file from its parsed content, a fragment of the message)
DAMAGE = [
    ("empty", lambda c: "", "not JSON"),
    ("not json", lambda c: json.dumps(c)[:-7], "not JSON"),
    ("binary", lambda c: b"\xff\xfe{\x00", "not JSON"),
    ("list", lambda c: json.dumps(list(c.values())), "needs an object"),
    ("null", lambda c: "null", "needs an object"),
    ("number", lambda c: "3", "needs an object"),
    ("missing key", lambda c: json.dumps({k: v for k, v in c.items() if k != "val"}),
     "needs an object with the keys"),
    ("rows not a list", lambda c: json.dumps({**c, "train": {"a": 1}}), "must be a list"),
    ("row too short", lambda c: first_row("train")(c, lambda r: r[:2]), "must be [image path"),
    ("row too long", lambda c: first_row("train")(c, lambda r: r + [1]), "must be [image path"),
    ("row a string", lambda c: first_row("val")(c, lambda r: r[0]), "must be [image path"),
    ("row null", lambda c: first_row("val")(c, lambda r: None), "must be [image path"),
    ("path a number", lambda c: first_row("train")(c, lambda r: [5, r[1], r[2]]),
     "image path must be"),
    ("path empty", lambda c: first_row("train")(c, lambda r: ["", r[1], r[2]]),
     "image path must be"),
    ("path absolute", lambda c: first_row("train")(c, lambda r: ["/etc/hostname", r[1], r[2]]),
     "outside the image folder"),
    ("path escapes", lambda c: first_row("train")(c, lambda r: ["../../x.jpg", r[1], r[2]]),
     "outside the image folder"),
    ("label a string", lambda c: first_row("train")(c, lambda r: [r[0], "0", r[2]]),
     "label must be an integer"),
    ("label a float", lambda c: first_row("train")(c, lambda r: [r[0], 0.5, r[2]]),
     "label must be an integer"),
    ("label a bool", lambda c: first_row("train")(c, lambda r: [r[0], True, r[2]]),
     "label must be an integer"),
    ("label negative", lambda c: first_row("train")(c, lambda r: [r[0], -1, r[2]]),
     "label must be an integer"),
    ("name null", lambda c: first_row("train")(c, lambda r: [r[0], r[1], None]),
     "class name must be"),
    ("name empty", lambda c: first_row("train")(c, lambda r: [r[0], r[1], " "]),
     "class name must be"),
    ("name a list", lambda c: first_row("train")(c, lambda r: [r[0], r[1], ["cat"]]),
     "class name must be"),
    ("label named twice", lambda c: first_row("train")(c, lambda r: [r[0], r[1], "tiger"]),
     "is also named"),
    ("name with two labels", lambda c: first_row("train")(c, lambda r: [r[0], 50, r[2]]),
     "also has the label"),
]
SPLIT_ONLY = [  # labels index the class names: they must be 0..n-1
    ("label out of range", lambda c: relabel(c, 3, 99), "labels must be 0..3"),
    ("labels not contiguous", lambda c: relabel(c, 1, 7), "labels must be 0..3"),
]


@pytest.mark.parametrize("case, damage, fragment", DAMAGE + SPLIT_ONLY,
                         ids=[d[0] for d in DAMAGE + SPLIT_ONLY])
def test_damaged_split_file(world, tmp_path, capsys, case, damage, fragment):
    root = copy_of(world.root, tmp_path)
    path = os.path.join(root, SPLIT)
    with open(path) as f:
        content = json.load(f)
    write(path, damage(content))
    expect_clear(world, capsys, "caltech101", root, path, fragment, tmp_path)


@pytest.mark.parametrize("case, damage, fragment", DAMAGE[:3] + DAMAGE[8:9] + SPLIT_ONLY[:1],
                         ids=[d[0] for d in DAMAGE[:3] + DAMAGE[8:9] + SPLIT_ONLY[:1]])
def test_damaged_folder_split_json(world, tmp_path, capsys, case, damage, fragment):
    """A folder: data set's split.json goes through the same reader."""
    root = copy_of(world.root, tmp_path)
    folder = os.path.join(root, "caltech-101", "101_ObjectCategories")
    with open(os.path.join(root, SPLIT)) as f:
        content = json.load(f)
    path = os.path.join(folder, "split.json")
    write(path, damage(content))
    expect_clear(world, capsys, f"folder:{folder}", root, path, fragment, tmp_path)


def fewshot_content(world):
    ds = data.build_dataset("caltech101", world.root)
    path = world.tmp / "fewshot_source.json"
    data.save_fewshot(str(path), *data.fewshot_split(ds.train, ds.val, 1, 1), ds.image_dir)
    return json.loads(path.read_text())


FEWSHOT_ONLY = [  # a fewshot.json names a subset of the classes: checked against the data set's
    ("label out of range", lambda c: relabel(c, 3, 99), "is not a class of"),
    ("another data set", lambda c: rename(c, "cat", "zebra"),
     "drawn from another data set"),
]


@pytest.mark.parametrize("case, damage, fragment",
                         [d for d in DAMAGE if d[0] != "label named twice"] + FEWSHOT_ONLY,
                         ids=[d[0] for d in DAMAGE if d[0] != "label named twice"]
                         + [d[0] for d in FEWSHOT_ONLY])
def test_damaged_fewshot_file(world, tmp_path, capsys, case, damage, fragment):
    path = tmp_path / "fewshot.json"
    write(path, damage(fewshot_content(world)))
    expect_clear(world, capsys, "caltech101", world.root, path, fragment, tmp_path,
                 "--fewshot_file", str(path))


def test_fewshot_label_named_twice(world, tmp_path, capsys):
    """One label under a second name is a file that disagrees with itself: refused by the
    reader whatever the data set."""
    content = fewshot_content(world)
    content["val"][0] = [content["val"][0][0], content["train"][0][1], "tiger"]
    path = tmp_path / "fewshot.json"
    path.write_text(json.dumps(content))
    expect_clear(world, capsys, "caltech101", world.root, path, "", tmp_path,
                 "--fewshot_file", str(path))


# -- the toy world's world.json and split.json ----------------------------------------------------

def fake_toy(tmp_path, stamp_text, split=True):
    """A toy folder as ensure_world finds it (the images are not needed to test the stamp)."""
    folder = tmp_path / "root" / "toy"
    folder.mkdir(parents=True)
    (folder / "world.json").write_text(stamp_text)
    if split:
        (folder / "split.json").write_text('{"train": [], "val": [], "test": []}')
    return str(tmp_path / "root"), folder


STAMP = json.dumps(stamp_of_world())
WORLD_DAMAGE = [  # (case, world.json text, split.json present, a fragment of the message)
    ("empty", "", True, "not JSON"),
    ("not json", STAMP[:-3], True, "not JSON"),
    ("list", json.dumps(list(stamp_of_world().values())), True, "must be a JSON object"),
    ("null", "null", True, "must be a JSON object"),
    ("missing key", json.dumps({k: v for k, v in stamp_of_world().items() if k != "seed"}), True,
     "other settings"),
    ("wrong value", json.dumps({**stamp_of_world(), "seed": "1"}), True, "other settings"),
    ("split.json deleted", STAMP, False, "split.json is missing"),
]


@pytest.mark.parametrize("case, text, split, fragment", WORLD_DAMAGE,
                         ids=[d[0] for d in WORLD_DAMAGE])
def test_damaged_toy_world(world, tmp_path, capsys, case, text, split, fragment):
    root, folder = fake_toy(tmp_path, text, split)
    path = folder / ("world.json" if split else "")
    expect_clear(world, capsys, "toy", root, str(path).rstrip("/"), fragment, tmp_path)
    out = outcome(lambda: train.main(run_argv(world, "toy", root, tmp_path / "r")), capsys,
                  folder, "delete the folder")
    assert out == "clear", out  # the fix is said: the toy folder is drawn again


def test_toy_world_drawn_by_two_processes_at_once(tmp_path, monkeypatch):
    """torchrun ranks from an empty data root each draw the world aside; the one whose rename comes
    second finds the other's world in place: it checks that one, and leaves no temporary folder."""
    import data.toy as toy_data
    path = str(tmp_path / "toy")

    def light(folder):  # the stamp and split only: the images are not what is tested
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "split.json"), "w") as f:
            f.write('{"train": [], "val": [], "test": []}')
        with open(os.path.join(folder, "world.json"), "w") as f:
            f.write(STAMP)

    def racing(folder):
        light(folder)
        light(path)  # meanwhile the other rank renamed its world into place

    monkeypatch.setattr(toy_data, "write_world", racing)
    assert toy_data.ensure_world(path) == path
    assert sorted(os.listdir(tmp_path)) == ["toy"]


# -- ImageNet's classnames.txt and class folders ---------------------------------------------------

CLASSNAMES_DAMAGE = [  # (case, file bytes, a fragment of the message)
    ("binary", b"\xff\xfe\x00n0", "not UTF-8"),
    ("no name", b"n00000001 cat\nn00000002\n", "line 2"),
    ("wnid twice", b"n00000001 cat\nn00000001 dog\n", "also on line 1"),
]


@pytest.mark.parametrize("case, text, fragment", CLASSNAMES_DAMAGE,
                         ids=[d[0] for d in CLASSNAMES_DAMAGE])
def test_damaged_classnames_txt(world, tmp_path, capsys, case, text, fragment):
    root = copy_of(world.imagenet, tmp_path)
    path = os.path.join(root, "imagenet", "classnames.txt")
    with open(path, "wb") as f:
        f.write(text)
    expect_clear(world, capsys, "imagenet", root, path, fragment, tmp_path)


@pytest.mark.parametrize("split, other", [("val", "train"), ("train", "val")])
def test_imagenet_split_missing_a_class(world, tmp_path, capsys, split, other):
    """Labels are folder positions (CoOp): a class missing from one split would shift every later
    label of that split (val "fish" carrying "dog"'s label). Refused, naming the folders."""
    root = copy_of(world.imagenet, tmp_path)
    folder = os.path.join(root, "imagenet", "images", split)
    shutil.rmtree(os.path.join(folder, synthetic.wnid(1)))
    fragment = synthetic.wnid(1)
    expect_clear(world, capsys, "imagenet", root, os.path.join(root, "imagenet", "images", "val"),
                 fragment, tmp_path)


def test_imagenet_labels_follow_one_class_list(world):
    ds = data.build_dataset("imagenet", world.imagenet)
    for items in (ds.train, ds.test):
        assert all(ds.classnames[d.label] == d.classname for d in items)


# -- names CLIP cannot tell apart, classes never evaluated, hidden folders, deep images ----------

TWINS = [
    ("NFC / NFD", unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")),
    ("fullwidth", "ｃａｔ", "cat"),
    ("case", "Cat", "cat"),
    ("underscore", "sea_lion", "sea lion"),
    ("spaces", "sea  lion", "sea lion"),
    ("html entity", "r&amp;b", "r&b"),
]


@pytest.mark.parametrize("case, a, b", TWINS, ids=[t[0] for t in TWINS])
def test_class_names_clip_reads_the_same_are_found(case, a, b):
    items = [data.Datum("x", 0, a), data.Datum("y", 1, "dog"), data.Datum("z", 2, b)]
    assert data.duplicate_classnames(items) == [[a, b]]


def test_different_names_are_not_twins():
    names = ["café", "cafe", "cat", "cats", "dog"]
    assert data.duplicate_classnames([data.Datum("x", i, n) for i, n in enumerate(names)]) == []


def test_class_without_training_images_is_warned_about(world, tmp_path):
    """CoOp cuts base/novel from the training labels only: a class with test images and no
    training image is neither, never evaluated. Kept (CoOp's numbers), but said in the log."""
    root = copy_of(world.root, tmp_path)
    path = os.path.join(root, SPLIT)
    with open(path) as f:
        content = json.load(f)
    content["train"] = [row for row in content["train"] if row[2] != "bird"]
    with open(path, "w") as f:
        json.dump(content, f)
    out = tmp_path / "run"
    train.main(run_argv(world, "caltech101", root, out, "--epochs", "0"))
    log = (out / "log.txt").read_text()
    assert "no training images" in log and "bird" in log


def test_hidden_class_folder_is_skipped_and_named(world, tmp_path, capsys):
    folder = synthetic.write_folder(tmp_path / "pets", ["cat", "dog", ".fish"], per_class=4)
    ds = data.build_dataset(f"folder:{folder}")
    assert ds.classnames == ["cat", "dog"]
    assert os.path.join(folder, ".fish") in capsys.readouterr().out


def test_hidden_folder_without_images_is_skipped_quietly(world, tmp_path, capsys):
    folder = synthetic.write_folder(tmp_path / "pets", ["cat", "dog"], per_class=4)
    os.makedirs(os.path.join(folder, ".ipynb_checkpoints"))
    capsys.readouterr()
    assert data.build_dataset(f"folder:{folder}").classnames == ["cat", "dog"]
    assert capsys.readouterr().out == ""


DEEP_GREY = [  # (case, pixels, PIL mode, 8-bit grey expected or None: refused)
    ("32-bit above 65535", np.full((8, 8), 200_000, np.int32), "I", None),
    ("32-bit negative", np.full((8, 8), -5, np.int32), "I", None),
    ("float", np.full((8, 8), 0.5, np.float32), "F", None),
    ("32-bit within 16 bits", np.full((8, 8), 65535, np.int32), "I", 255),
    ("32-bit mid grey", np.full((8, 8), 257 * 100, np.int32), "I", 100),
]


@pytest.mark.parametrize("case, pixels, mode, grey", DEEP_GREY, ids=[d[0] for d in DEEP_GREY])
def test_deep_grey_tiff(tmp_path, case, pixels, mode, grey):
    path = str(tmp_path / "deep.tif")
    Image.fromarray(pixels, mode).save(path)
    assert Image.open(path).mode == mode
    if grey is None:
        with pytest.raises(OSError, match="deep.tif.*convert the image"):
            data.load_image(path)
    else:
        assert (np.asarray(data.load_image(path)) == grey).all()
