"""data/: CoOp's few-shot draw and base/novel split, transforms, fewshot.json,
loaders, error messages."""
import json
import os
import random
from collections import defaultdict

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

import data
from clip.transform import MEAN, STD, Preprocess
from data import (
    Datum,
    DatasetNotFound,
    build_dataset,
    fewshot_split,
    load_fewshot,
    save_fewshot,
    subsample_classes,
)
from data.datasets import read_split
from data.transforms import random_resized_crop_box, train_transform_on_device
from tests.synthetic import jpeg


# -----------------------------------------------------------------------------
# few-shot sampling: compared with Dassl's generate_fewshot_dataset, written out independently here


def dassl_fewshot(train, val, shots, seed):
    """What CoOp does: set_random_seed(seed), then generate_fewshot_dataset on train, then
    on val (repeat=False)."""
    random.seed(seed)

    def generate(data_source, num_shots):
        tracker = defaultdict(list)
        for item in data_source:
            tracker[item.label].append(item)
        dataset = []
        for label, items in tracker.items():
            if len(items) >= num_shots:
                sampled = random.sample(items, num_shots)
            else:
                sampled = items
            dataset.extend(sampled)
        return dataset

    return generate(train, shots), generate(val, min(shots, 4))


@pytest.fixture(scope="module")
def split_json(tmp_path_factory):
    """A split_zhou-style file: 120 classes of 1..40 train images, labels
    interleaved in a shuffled order."""
    rng = random.Random(1234)
    n_cls = 120
    split = {}
    for key, sizes in (("train", lambda: rng.randint(1, 40)), ("val", lambda: rng.randint(1, 8)),
                       ("test", lambda: 3)):
        rows = [[f"c{label:03d}/{key}_{i:03d}.jpg", label,
                 f"class_{label}"] for label in range(n_cls) for i in range(sizes())]
        rng.shuffle(rows)  # first-appearance order of labels is now neither sorted nor grouped
        split[key] = rows
    path = tmp_path_factory.mktemp("split") / "split_zhou_Synthetic.json"
    path.write_text(json.dumps(split))
    return str(path)


def test_fewshot_equals_dassl(split_json):
    train, val, _ = read_split(split_json, "/images")
    first_seen = list(dict.fromkeys(item.label for item in train))
    assert first_seen != sorted(first_seen)  # the data really tests the grouping order
    # and classes below K
    assert min(len([t for t in train if t.label == c]) for c in first_seen) < 16
    for seed in (1, 2, 3):
        for shots in (1, 2, 4, 8, 16):
            got = fewshot_split(train, val, shots, seed)
            want = dassl_fewshot(train, val, shots, seed)
            assert got[0] == want[0] and got[1] == want[1], (seed, shots)
            assert len({item.label for item in got[0]}) == 120


def test_fewshot_reference_is_sensitive(split_json):
    """The comparison above would catch a wrong class order or a reseed before val."""
    train, val, _ = read_split(split_json, "/images")
    want_train, want_val = dassl_fewshot(train, val, 16, 1)
    # grouping in sorted-label order instead
    by_sorted_label = sorted(train, key=lambda item: item.label)
    assert fewshot_split(by_sorted_label, val, 16, 1)[0] != want_train
    assert fewshot_split(val, [], 4, 1)[0] != want_val  # val drawn with a fresh stream


def test_fewshot_pure_and_all(split_json):
    train, val, _ = read_split(split_json, "/images")
    state = random.getstate()
    assert fewshot_split(train, val, 4, 2) == fewshot_split(train, val, 4, 2)
    assert random.getstate() == state  # the global RNG is not touched
    assert fewshot_split(train, val, 4, 1) != fewshot_split(train, val, 4, 2)
    for shots in (-1, 0):
        assert fewshot_split(train, val, shots, 1) == (train, val)


# -----------------------------------------------------------------------------
# base / novel


@pytest.mark.parametrize("n,base,new", [(37, 19, 18), (47, 24, 23), (100, 50, 50), (397, 199, 198)])
def test_base_new_counts_and_relabel(n, base, new):
    labels = list(range(n))
    random.Random(n).shuffle(labels)
    train = [Datum(f"/x/{c}_{i}.jpg", c, f"name_{c}") for c in labels for i in range(2)]
    test = [Datum(f"/x/t{c}.jpg", c, f"name_{c}") for c in reversed(labels)]
    (b_train, b_test), b_names = subsample_classes("base", train, test)
    (n_train, n_test), n_names = subsample_classes("new", train, test)
    assert len(b_names) == base and len(n_names) == new
    assert b_names == [f"name {c}" for c in range(base)]  # names cleaned with "_" -> " "
    assert n_names == [f"name {c}" for c in range(base, n)]
    assert (
        sorted({d.label for d in b_train}) == list(range(base)) == sorted({d.label for d in b_test})
    )
    assert sorted({d.label for d in n_test}) == list(range(new))
    # each item keeps its path and class name; only the label moves, and the order is kept
    assert [d.impath for d in n_train] == [d.impath for d in train if d.label >= base]
    assert all(d.classname == f"name_{d.label + base}" for d in n_train + n_test)
    assert all(d.classname == f"name_{d.label}" for d in b_train + b_test)
    (a_train, a_test), a_names = subsample_classes("all", train, test)
    assert a_train == train and a_test == test and len(a_names) == n


def test_base_new_takes_labels_from_first_list():
    train = [Datum(f"/x/{c}.jpg", c, str(c)) for c in (0, 2, 4, 6)]  # labels 1, 3, 5 only in test
    test = [Datum(f"/x/t{c}.jpg", c, str(c)) for c in range(7)]
    (_, b_test), names = subsample_classes("base", train, test)
    assert names == ["0", "2"] and [d.impath for d in b_test] == ["/x/t0.jpg", "/x/t2.jpg"]
    with pytest.raises(ValueError, match="subsample"):
        subsample_classes("novel", train, test)


# -----------------------------------------------------------------------------
# fewshot.json


def test_fewshot_json_round_trip(tmp_path, split_json):
    image_dir = str(tmp_path / "images")
    train, val, _ = read_split(split_json, image_dir)
    train, val = fewshot_split(train, val, 4, 3)
    path = tmp_path / "run" / "fewshot.json"
    save_fewshot(str(path), train, val, image_dir)
    saved = json.loads(path.read_text())
    assert set(saved) == {"train", "val"} and len(saved["train"]) == len(train)
    assert saved["train"][0] == [os.path.relpath(train[0].impath, image_dir), train[0].label,
                                 train[0].classname]
    assert load_fewshot(str(path), image_dir) == (train, val)
    with pytest.raises(ValueError, match="not inside"):
        save_fewshot(str(path), [Datum("/elsewhere/a.jpg", 0, "a")], [], image_dir)


# -----------------------------------------------------------------------------
# transforms


def test_test_transform_is_clips_preprocess(tmp_path):
    assert data.test_transform is Preprocess
    path = jpeg(str(tmp_path / "a.jpg"), size=(500, 375), noise_seed=0)
    ref = Preprocess(224)(Image.open(path))
    images, labels = next(iter(data.test_loader([Datum(path, 7, "a")], 224, workers=0)))
    assert torch.equal(images[0], ref) and labels.tolist() == [7]


def test_train_transform(tmp_path):
    img = Image.open(jpeg(str(tmp_path / "a.jpg"), size=(500, 375), noise_seed=1)).convert("RGB")
    x = data.train_transform(img, 64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    per_channel = x.flatten(1)
    assert (per_channel.min(1).values >= lo - 1e-5).all() and (
        per_channel.max(1).values <= hi + 1e-5
    ).all()
    assert not torch.equal(data.train_transform(img, 64), data.train_transform(img, 64))
    same = [data.train_transform(img, 64, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*same)
    torch.manual_seed(3)  # generator=None draws the same numbers from the global RNG
    assert torch.equal(data.train_transform(img, 64), same[0])


def test_train_transform_steps(tmp_path):
    """crop box -> crop -> bicubic resize -> flip with p=0.5 -> to_tensor ->
    normalize, drawn in that order."""
    from clip.transform import normalize, to_tensor

    img = Image.open(jpeg(str(tmp_path / "a.jpg"), size=(90, 60), noise_seed=3)).convert("RGB")
    flips = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        left, top, w, h = random_resized_crop_box(90, 60, generator=g)
        want = img.crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC)
        flip = torch.rand(1, generator=g).item() < 0.5
        want = want.transpose(Image.FLIP_LEFT_RIGHT) if flip else want
        flips.add(flip)
        got = data.train_transform(img, 32, torch.Generator().manual_seed(seed))
        assert torch.equal(got, normalize(to_tensor(want)))
    assert flips == {True, False}


def test_train_transform_on_device_is_the_same_transform(tmp_path):
    """The GPU path (run here on the CPU): same boxes and flips for the same seed,
    PIL's pixels to rounding."""
    img = Image.open(jpeg(str(tmp_path / "a.jpg"), size=(500, 375), noise_seed=4)).convert("RGB")
    pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # [3, 375, 500] uint8
    # back to [0, 1]
    to_unit = lambda x: x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    diffs = []
    for seed in range(20):
        g_pil, g_dev = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        want = data.train_transform(img, 224, g_pil)
        got = train_transform_on_device(pixels, 224, "cpu", g_dev)
        # the same draws, in the same order
        assert torch.equal(g_pil.get_state(), g_dev.get_state())
        # in grey levels; a wrong box or flip: ~40
        diffs.append((to_unit(got) - to_unit(want)).abs() * 255)
    diffs = torch.stack(diffs)
    assert diffs.mean() < 0.5  # measured 0.20 grey levels
    assert (diffs > 1.5).float().mean() < 0.015  # measured 0.03% of the pixels
    # measured 13: PIL clips to 0..255 between its two passes, torch does not
    assert diffs.max() < 32
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32


def test_trainset_on_device(tmp_path):
    """TrainSet(device=...) keeps uint8 pixels and gives the same boxes as the
    PIL path, seed for seed."""
    items = [Datum(jpeg(str(tmp_path / f"{i}.jpg"), size=(120, 90), noise_seed=i), i,
                   "c") for i in range(3)]
    pil, dev, again = (data.TrainSet(items, 32, seed=5, device=d) for d in (None, "cpu", "cpu"))
    assert all(x.dtype == torch.uint8 and x.shape == (3, 90, 120) for x in dev.images.values())
    for i in range(3):
        (a, label), (b, _), (c, _) = pil[i], dev[i], again[i]
        assert label == i and b.shape == (3, 32, 32) and torch.equal(b, c)
        assert (a - b).abs().mean() < 0.02  # normalised units; a wrong box or flip is ~0.5 here
    assert torch.equal(pil.generator.get_state(), dev.generator.get_state())


def test_random_resized_crop_box():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(500, 375, generator=g)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.08 * 500 * 375 * 0.9 <= w * h <= 500 * 375
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # a 1000x10 strip: no crop of the allowed area fits, so a center crop
    # with the ratio clamped to 4/3
    assert random_resized_crop_box(1000, 10, generator=g) == (493, 0, 13, 10)
    assert random_resized_crop_box(10, 1000, generator=g) == (0, 493, 10, 13)


# -----------------------------------------------------------------------------
# loaders


def test_trainset_decodes_each_file_once(tmp_path, monkeypatch):
    paths = [jpeg(str(tmp_path / f"{i}.jpg"), color=(i * 40, 0, 0)) for i in range(5)]
    # one path twice
    items = [Datum(p, i % 2, "c") for i, p in enumerate(paths)] + [Datum(paths[0], 0, "c")]
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a,
                        **k: opened.append(fp) or real_open(fp, *a, **k))
    ts = data.TrainSet(items, 32, seed=0)
    loader = torch.utils.data.DataLoader(ts, batch_size=4, shuffle=True)
    for _ in range(3):
        for images, labels in loader:
            assert images.shape[1:] == (3, 32, 32)
    assert sorted(opened) == sorted(paths)
    assert [ts[i][1] for i in range(len(ts))] == [d.label for d in items]


def test_trainset_seeded(tmp_path):
    items = [Datum(jpeg(str(tmp_path / f"{i}.jpg"), size=(60, 45), noise_seed=i), i,
                   "c") for i in range(3)]
    a, b = data.TrainSet(items, 32, seed=4), data.TrainSet(items, 32, seed=4)
    for i in range(3):
        assert torch.equal(a[i][0], b[i][0])


def test_test_loader_workers_in_order(tmp_path):
    items = [Datum(jpeg(str(tmp_path / f"{i}.jpg"), size=(50, 40), color=(i * 20, 100, 0)), i,
                   "c") for i in range(11)]
    seen_images, seen_labels = [], []
    for images, labels in data.test_loader(items, 32, batch_size=4, workers=2):
        seen_images.append(images)
        seen_labels += labels.tolist()
    assert seen_labels == list(range(11))
    want = torch.stack([Preprocess(32)(Image.open(d.impath)) for d in items])
    assert torch.equal(torch.cat(seen_images), want)



def test_test_loader_batch_above_the_test_set_is_the_test_set(tmp_path):
    """--eval_batch_size 10**20 (above sys.maxsize, which DataLoader's sampler refuses): one batch
    of the whole test set."""
    items = [Datum(jpeg(str(tmp_path / f"{i}.jpg"), size=(50, 40), color=(i * 20, 100, 0)), i,
                   "c") for i in range(3)]
    (images, labels), = data.test_loader(items, 32, batch_size=10**20, workers=0)
    assert labels.tolist() == [0, 1, 2] and images.shape == (3, 3, 32, 32)

def test_truncated_jpeg_names_the_file(tmp_path):
    good = jpeg(str(tmp_path / "good.jpg"), size=(200, 150), noise_seed=2)
    bad = str(tmp_path / "bad.jpg")
    with open(good, "rb") as f, open(bad, "wb") as g:
        g.write(f.read()[:2000])
    with pytest.raises(OSError, match="bad.jpg"):
        data.load_image(bad)
    with pytest.raises(OSError, match="bad.jpg"):
        data.TrainSet([Datum(good, 0, "c"), Datum(bad, 0, "c")], 32)
    with pytest.raises(OSError, match="bad.jpg"):
        list(data.test_loader([Datum(bad, 0, "c")], 32, workers=0))


# -----------------------------------------------------------------------------
# error messages


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="unknown dataset 'eurosatt'") as err:
        build_dataset("eurosatt", "/tmp")
    assert all(name in str(err.value) for name in data.DATASETS) and "folder:" in str(err.value)


def test_missing_root(tmp_path, monkeypatch):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFound) as err:
        build_dataset("eurosat", missing)
    msg = str(err.value)
    assert (
        "eurosat" in msg
        and missing in msg
        and f"python -m data.prepare eurosat --root {missing}" in msg
    )
    monkeypatch.delenv("DATA", raising=False)
    with pytest.raises(DatasetNotFound, match=r"--root DIR or set \$DATA"):
        build_dataset("dtd")
    monkeypatch.setenv("DATA", missing)
    with pytest.raises(DatasetNotFound, match="nowhere"):
        build_dataset("dtd")


def test_missing_split_file(tmp_path):
    jpeg(str(tmp_path / "eurosat" / "2750" / "Forest" / "Forest_1.jpg"))
    with pytest.raises(DatasetNotFound) as err:
        build_dataset("eurosat", str(tmp_path))
    msg = str(err.value)
    assert "eurosat: split file not found" in msg
    assert str(tmp_path / "eurosat" / "split_zhou_EuroSAT.json") in msg
    assert f"python -m data.prepare eurosat --root {tmp_path}" in msg
    assert "drive.google.com/file/d/1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o" in msg


def test_wrong_layout(tmp_path):
    # EuroSAT unpacked one level too deep: eurosat/EuroSAT/2750 instead of eurosat/2750
    jpeg(str(tmp_path / "eurosat" / "EuroSAT" / "2750" / "Forest" / "Forest_1.jpg"))
    split = {"train": [["Forest/Forest_1.jpg", 0, "Forest"]], "val": [], "test": []}
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    with pytest.raises(DatasetNotFound) as err:
        build_dataset("eurosat", str(tmp_path))
    assert "image folder not found" in str(err.value) and str(tmp_path / "eurosat" / "2750") in str(
        err.value
    )
    # the folder exists but the listed files are elsewhere
    os.makedirs(tmp_path / "eurosat" / "2750")
    with pytest.raises(DatasetNotFound, match="1 of the 1 images listed .* are missing") as err:
        build_dataset("eurosat", str(tmp_path))
    assert str(tmp_path / "eurosat" / "2750" / "Forest" / "Forest_1.jpg") in str(err.value)


def test_imagenet_flat_val(tmp_path):
    root = tmp_path / "imagenet"
    jpeg(str(root / "images" / "train" / "n01440764" / "a.JPEG"))
    jpeg(str(root / "images" / "val" / "ILSVRC2012_val_00000001.JPEG"))
    (root / "classnames.txt").write_text("n01440764 tench\n")
    with pytest.raises(DatasetNotFound, match="valprep"):
        build_dataset("imagenet", str(tmp_path))
    with pytest.raises(DatasetNotFound) as err:
        build_dataset("imagenet_a", str(tmp_path))
    assert "imagenet-adversarial" in str(err.value) and "python -m data.prepare imagenet_a" in str(
        err.value
    )


def test_empty_class_folder(tmp_path):
    for i in range(4):
        jpeg(str(tmp_path / "cat" / f"{i}.jpg"))
    os.makedirs(tmp_path / "dog")
    with pytest.raises(DatasetNotFound) as err:
        build_dataset(f"folder:{tmp_path}")
    assert str(tmp_path / "dog") in str(err.value) and "no images" in str(err.value)
    with pytest.raises(DatasetNotFound, match="no class sub-folders"):
        build_dataset(f"folder:{tmp_path / 'cat'}")
