"""Every reader on a tiny copy of its data set's real on-disk layout, and data.prepare
against a local server."""
import functools
import hashlib
import http.server
import io
import json
import os
import re
import tarfile
import threading
import zipfile

import pytest
from PIL import Image

import clip.clip
import data
from data import DatasetNotFound, build_dataset, prepare, sources
from tests.synthetic import jpeg, refused_url, serve

IMAGENET_NAMES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def split_dataset(root, folder, image_dir, split_file, rows):
    """rows: {split: [(path relative to image_dir, label, classname)]}; writes the
    images and the split JSON."""
    for split_rows in rows.values():
        for rel, _, _ in split_rows:
            jpeg(os.path.join(root, folder, image_dir, rel))
    write(os.path.join(root, folder, split_file),
          json.dumps({k: [list(r) for r in v] for k, v in rows.items()}))


def classnames_txt(path, names=IMAGENET_NAMES):
    write(path, "".join(f"{wnid} {name}\n" for wnid, name in names.items()))


# One builder per data set: writes the layout under root, returns what the reader must give:
# (classnames, sizes of train/val/test, one expected (relative path, label, classname) of test)


def make_caltech101(root):
    split_dataset(root, "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", {
        "train": [("accordion/image_0001.jpg", 0, "accordion"),
                  ("airplanes/image_0001.jpg", 1, "airplane")],
        "val": [("accordion/image_0002.jpg", 0, "accordion")],
        "test": [("airplanes/image_0003.jpg", 1, "airplane")],
    })  # fmt: skip
    # not in the split
    jpeg(os.path.join(root, "caltech-101", "101_ObjectCategories", "BACKGROUND_Google",
                      "image_0001.jpg"))
    return (
        ["accordion", "airplane"],
        (2, 1, 1),
        ("caltech-101/101_ObjectCategories/airplanes/image_0003.jpg", 1, "airplane"),
    )


def make_oxford_pets(root):
    split_dataset(root, "oxford_pets", "images", "split_zhou_OxfordPets.json", {
        "train": [("american_bulldog_10.jpg", 1, "american_bulldog"),
                  ("Abyssinian_1.jpg", 0, "abyssinian")],
        "val": [("Abyssinian_2.jpg", 0, "abyssinian")],
        "test": [("american_bulldog_11.jpg", 1, "american_bulldog"),
                 ("Abyssinian_3.jpg", 0, "abyssinian")],
    })  # fmt: skip
    os.makedirs(os.path.join(root, "oxford_pets", "annotations"))
    return ["abyssinian", "american bulldog"], (2, 1,
                                                2), ("oxford_pets/images/american_bulldog_11.jpg",
                                                     1, "american_bulldog")


def make_stanford_cars(root):
    # paths in this split file are relative to the dataset folder, not to an image folder
    split_dataset(root, "stanford_cars", "", "split_zhou_StanfordCars.json", {
        "train": [("cars_train/00001.jpg", 0, "2012 AM General Hummer SUV"),
                  ("cars_train/00002.jpg", 1, "2012 Acura RL Sedan")],
        "val": [("cars_train/00003.jpg", 1, "2012 Acura RL Sedan")],
        "test": [("cars_test/00001.jpg", 0, "2012 AM General Hummer SUV")],
    })  # fmt: skip
    return (
        ["2012 AM General Hummer SUV", "2012 Acura RL Sedan"],
        (2, 1, 1),
        ("stanford_cars/cars_test/00001.jpg", 0, "2012 AM General Hummer SUV"),
    )


def make_oxford_flowers(root):
    split_dataset(root, "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", {
        "train": [("image_06734.jpg", 0, "pink primrose"),
                  ("image_06735.jpg", 1, "hard-leaved pocket orchid")],
        "val": [("image_06736.jpg", 0, "pink primrose")],
        "test": [("image_06737.jpg", 1, "hard-leaved pocket orchid")],
    })  # fmt: skip
    write(os.path.join(root, "oxford_flowers", "cat_to_name.json"),
          json.dumps({"1": "pink primrose"}))
    return (
        ["pink primrose", "hard-leaved pocket orchid"],
        (2, 1, 1),
        ("oxford_flowers/jpg/image_06737.jpg", 1, "hard-leaved pocket orchid"),
    )


def make_food101(root):
    split_dataset(root, "food-101", "images", "split_zhou_Food101.json", {
        "train": [("apple_pie/1005649.jpg", 0, "apple_pie"),
                  ("baby_back_ribs/1005293.jpg", 1, "baby_back_ribs")],
        "val": [("apple_pie/1011328.jpg", 0, "apple_pie")],
        "test": [("baby_back_ribs/1007102.jpg", 1, "baby_back_ribs")],
    })  # fmt: skip
    return ["apple pie", "baby back ribs"], (2, 1,
                                             1), ("food-101/images/baby_back_ribs/1007102.jpg", 1,
                                                  "baby_back_ribs")


def make_fgvc_aircraft(root):
    d = os.path.join(root, "fgvc_aircraft")
    write(os.path.join(d, "variants.txt"), "707-320\n727-200\nA300B4\n")
    # labels follow variants.txt, not the order in which variants first appear in the lists
    lists = {"train": ["1025794 A300B4", "1340192 707-320"], "val": ["0056978 727-200"],
             "test": ["0062765 A300B4", "0041018 707-320"]}
    for split, lines in lists.items():
        write(os.path.join(d, f"images_variant_{split}.txt"), "\n".join(lines) + "\n")
        for line in lines:
            jpeg(os.path.join(d, "images", line.split(" ")[0] + ".jpg"))
    # other official lists are ignored
    write(os.path.join(d, "images_family_train.txt"), "1025794 A300\n")
    return ["707-320", "727-200", "A300B4"], (2, 1, 2), ("fgvc_aircraft/images/0062765.jpg", 2,
                                                         "A300B4")


def make_sun397(root):
    split_dataset(root, "sun397", "SUN397", "split_zhou_SUN397.json", {
        "train": [("a/abbey/sun_aaalbzqrimafwbiv.jpg", 0, "abbey"),
                  ("a/apse/indoor/sun_aaqovgfxwiqcbvmj.jpg", 1, "indoor apse")],
        "val": [("a/abbey/sun_abbsqbcijhvhxhmd.jpg", 0, "abbey")],
        "test": [("a/apse/indoor/sun_abzxsnrcvngiqorx.jpg", 1, "indoor apse")],
    })  # fmt: skip
    write(os.path.join(root, "sun397", "ClassName.txt"), "/a/abbey\n/a/apse/indoor\n")
    return ["abbey", "indoor apse"], (2, 1,
                                      1), ("sun397/SUN397/a/apse/indoor/sun_abzxsnrcvngiqorx.jpg",
                                           1, "indoor apse")


def make_dtd(root):
    split_dataset(root, "dtd", "images", "split_zhou_DescribableTextures.json", {
        "train": [("banded/banded_0002.jpg", 0, "banded"),
                  ("blotchy/blotchy_0003.jpg", 1, "blotchy"),
                  ("braided/braided_0050.jpg", 2, "braided")],
        "val": [("banded/banded_0004.jpg", 0, "banded")],
        "test": [("braided/braided_0051.jpg", 2, "braided")],
    })  # fmt: skip
    os.makedirs(os.path.join(root, "dtd", "labels"))
    return ["banded", "blotchy", "braided"], (3, 1, 1), ("dtd/images/braided/braided_0051.jpg", 2,
                                                         "braided")


def make_eurosat(root):
    split_dataset(root, "eurosat", "2750", "split_zhou_EuroSAT.json", {
        "train": [("AnnualCrop/AnnualCrop_1.jpg", 0, "Annual Crop Land"),
                  ("Forest/Forest_12.jpg", 1, "Forest")],
        "val": [("Forest/Forest_13.jpg", 1, "Forest")],
        "test": [("AnnualCrop/AnnualCrop_2.jpg", 0, "Annual Crop Land")],
    })  # fmt: skip
    return ["Annual Crop Land", "Forest"], (2, 1, 1), ("eurosat/2750/AnnualCrop/AnnualCrop_2.jpg",
                                                       0, "Annual Crop Land")


def make_ucf101(root):
    split_dataset(root, "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", {
        "train": [("Apply_Eye_Makeup/v_ApplyEyeMakeup_g08_c01.jpg", 0, "Apply_Eye_Makeup"),
                  ("Archery/v_Archery_g08_c01.jpg", 1, "Archery")],
        "val": [("Archery/v_Archery_g09_c02.jpg", 1, "Archery")],
        "test": [("Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg", 0, "Apply_Eye_Makeup")],
    })  # fmt: skip
    return (
        ["Apply Eye Makeup", "Archery"],
        (2, 1, 1),
        (
            "ucf101/UCF-101-midframes/Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg",
            0,
            "Apply_Eye_Makeup",
        ),
    )


def make_imagenet(root):
    d = os.path.join(root, "imagenet")
    classnames_txt(os.path.join(d, "classnames.txt"))
    for wnid in IMAGENET_NAMES:
        for i in (10026, 10027):
            jpeg(os.path.join(d, "images", "train", wnid, f"{wnid}_{i}.JPEG"))
    jpeg(os.path.join(d, "images", "val", "n01484850", "ILSVRC2012_val_00000002.JPEG"))
    jpeg(os.path.join(d, "images", "val", "n01440764", "ILSVRC2012_val_00000293.JPEG"))
    jpeg(os.path.join(d, "images", "val", "n01443537", "ILSVRC2012_val_00000236.JPEG"))
    return (
        ["tench", "goldfish", "great white shark"],
        (6, 3, 3),
        ("imagenet/images/val/n01484850/ILSVRC2012_val_00000002.JPEG", 2, "great white shark"),
    )


def make_imagenetv2(root):
    # only ImageNet's copy: the fallback
    classnames_txt(os.path.join(root, "imagenet", "classnames.txt"))
    d = os.path.join(root, "imagenetv2", "imagenetv2-matched-frequency-format-val")
    for label in range(3):
        jpeg(os.path.join(d, str(label), f"{label}abc7f1e0b36b2e4d4e32fd2b1c9f43b95a3.jpeg"))
    return (
        ["tench", "goldfish", "great white shark"],
        (0, 0, 3),
        (
            "imagenetv2/imagenetv2-matched-frequency-format-val/2/"
            "2abc7f1e0b36b2e4d4e32fd2b1c9f43b95a3.jpeg",
            2,
            "great white shark",
        ),
    )


def make_imagenet_sketch(root):
    classnames_txt(os.path.join(root, "imagenet-sketch", "classnames.txt"))
    for wnid in IMAGENET_NAMES:
        jpeg(os.path.join(root, "imagenet-sketch", "images", wnid, "sketch_1.JPEG"))
    return (
        ["tench", "goldfish", "great white shark"],
        (0, 0, 3),
        ("imagenet-sketch/images/n01443537/sketch_1.JPEG", 1, "goldfish"),
    )


def variant(root, folder, image_dir):
    # 2 of the classes, relabelled 0..1 by sorted folder name; README.txt at the top is not a class
    classnames_txt(os.path.join(root, folder, "classnames.txt"))
    for wnid in ("n01484850", "n01443537"):
        jpeg(os.path.join(root, folder, image_dir, wnid,
                          "0.000116_digital clock _ digital clock_0.865662.jpg"))
    write(os.path.join(root, folder, image_dir, "README.txt"), "ImageNet-A\n")
    return (
        ["goldfish", "great white shark"],
        (0, 0, 2),
        (
            f"{folder}/{image_dir}/n01484850/0.000116_digital clock _ digital clock_0.865662.jpg",
            1,
            "great white shark",
        ),
    )


def make_imagenet_a(root):
    return variant(root, "imagenet-adversarial", "imagenet-a")


def make_imagenet_r(root):
    return variant(root, "imagenet-rendition", "imagenet-r")


def make_toy(root):
    # nothing to write: the toy world draws itself into the root on first use (data/toy.py)
    from clip.toy import CLASSNAMES
    from data.toy import PER_CLASS

    n = len(CLASSNAMES)
    return sorted(CLASSNAMES), (n * PER_CLASS["train"], n * PER_CLASS["val"],
                                n * PER_CLASS["test"]), ("toy/ant/test_000.png", 0, "ant")


BUILDERS = {name[len("make_") :]: fn for name, fn in globals().items() if name.startswith("make_")}


def test_every_dataset_has_a_reader_test():
    assert set(BUILDERS) == set(data.DATASETS)


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_reader(name, tmp_path):
    root = str(tmp_path)
    classnames, sizes, (rel, label, cname) = BUILDERS[name](root)
    ds = build_dataset(name, root)
    assert ds.name == name and ds.template == data.DATASETS[name].template
    assert ds.classnames == classnames
    assert (len(ds.train), len(ds.val), len(ds.test)) == sizes
    assert data.Datum(os.path.join(root, rel), label, cname) in ds.test
    for item in ds.train + ds.val + ds.test:
        assert os.path.isabs(item.impath) and os.path.isfile(item.impath)
        assert os.path.commonpath([item.impath, ds.image_dir]) == ds.image_dir
        assert ds.classnames[item.label] == item.classname.replace("_", " ")


def test_reader_missing_dataset_folder(tmp_path):
    for name in (n for n in data.DATASETS if n != "toy"):  # the toy world draws itself instead
        with pytest.raises(DatasetNotFound) as err:
            build_dataset(name, str(tmp_path))
        msg = str(err.value)
        assert (
            msg.startswith(f"{name}:")
            and str(tmp_path) in msg
            and f"python -m data.prepare {name} --root {tmp_path}" in msg
        )


def test_templates():
    t = {name: spec.template for name, spec in data.DATASETS.items()}
    assert t["oxford_pets"] == "a photo of a {}, a type of pet."
    assert t["oxford_flowers"] == "a photo of a {}, a type of flower."
    assert t["fgvc_aircraft"] == "a photo of a {}, a type of aircraft."
    assert t["dtd"] == "{} texture."
    assert t["eurosat"] == "a centered satellite photo of {}."
    assert t["food101"] == "a photo of {}, a type of food."
    assert t["ucf101"] == "a photo of a person doing {}."
    for name in ("stanford_cars", "sun397", "caltech101", "imagenet", "imagenetv2",
                 "imagenet_sketch", "imagenet_a", "imagenet_r"):
        assert t[name] == "a photo of a {}."


# -----------------------------------------------------------------------------
# folder:/path


def test_folder_auto_split(tmp_path):
    for cls, n in (("golden_retriever", 10), ("tabby cat", 7)):
        for i in range(n):
            jpeg(str(tmp_path / cls / f"{i:02d}.jpg"))
    write(str(tmp_path / "tabby cat" / "notes.txt"), "not an image")
    ds = build_dataset(f"folder:{tmp_path}")
    assert ds.classnames == ["golden retriever", "tabby cat"] and ds.template == "a photo of a {}."
    count = lambda items, y: sum(d.label == y for d in items)  # noqa: E731
    assert [count(ds.train, 0), count(ds.val, 0), count(ds.test, 0)] == [5, 2, 3]
    # round(3.5)=4, round(1.4)=1
    assert [count(ds.train, 1), count(ds.val, 1), count(ds.test, 1)] == [4, 1, 2]
    assert len({d.impath for d in ds.train + ds.val + ds.test}) == 17
    again = build_dataset(f"folder:{tmp_path}")
    # fixed seed: same split every time
    assert (again.train, again.val, again.test) == (ds.train, ds.val, ds.test)
    # but shuffled
    assert [d.impath for d in ds.train[:5]] != sorted(d.impath for d in ds.train[:5])


def test_folder_with_split_json(tmp_path):
    for rel in ("a_b/1.jpg", "a_b/2.jpg", "c/1.jpg"):
        jpeg(str(tmp_path / rel))
    split = {"train": [["a_b/1.jpg", 0, "a_b"], ["c/1.jpg", 1, "c"]], "val": [],
             "test": [["a_b/2.jpg", 0, "a_b"]]}
    write(str(tmp_path / "split.json"), json.dumps(split))
    ds = build_dataset(f"folder:{tmp_path}")
    assert ds.classnames == ["a b", "c"] and len(ds.train) == 2 and len(ds.test) == 1


def test_folder_too_small(tmp_path):
    for i in range(3):
        jpeg(str(tmp_path / "few" / f"{i}.jpg"))
    with pytest.raises(DatasetNotFound, match="3 images, too few"):
        build_dataset(f"folder:{tmp_path}")


# -----------------------------------------------------------------------------
# data.prepare: a local http server plays the dataset hosts


@pytest.fixture()
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class FakeDrive:
    """Google Drive's two answers to uc?export=download&id=ID: the file itself (small files), or for
    files in `large` an HTML page whose "download anyway" form (hidden id, export, confirm, uuid)
    leads to the file; `legacy` pages carry a confirm-token link instead, `quota` ones neither."""

    def __init__(self):
        self.files, self.large, self.legacy, self.quota, self.requests = {}, set(), set(), set(), []
        self.httpd, self.url = serve(self.answer)

    def answer(self, h):
        path, _, query = h.path.partition("?")
        q = dict(p.split("=", 1) for p in query.split("&") if p)
        self.requests.append(h.path)
        file_id = q.get("id")
        if file_id not in self.files:
            return h.send_error(404)
        confirmed = (
            path == "/download"
            and q.get("confirm") == "t"
            and q.get("uuid") == "u-1"
            or q.get("confirm") == "TOKEN"
        )
        if path == "/uc" and file_id in self.quota:
            return self.send(h,
                             b"<html><title>Google Drive - Quota exceeded</title>too "
                             b"many users</html>", "text/html")
        if path == "/uc" and file_id in self.legacy and not confirmed:
            link = (f'<a id="uc-download-link" '
                    f'href="/uc?export=download&amp;confirm=TOKEN&amp;id={file_id}">'
                    f'Download anyway</a>')
            return self.send(h, f"<html><title>Google Drive</title>{link}</html>".encode(),
                             "text/html")
        if path == "/uc" and file_id in self.large:
            form = (f'<form id="download-form" action="{self.url}/download" method="get">'
                    '<input type="submit" id="uc-download-link" value="Download anyway"/>'
                    f'<input type="hidden" name="id" value="{file_id}"><input type="hidden" '
                    f'name="export" value="download">'
                    '<input type="hidden" name="confirm" value="t"><input type="hidden" '
                    'name="uuid" value="u-1"></form>')
            return self.send(h,
                             f"<html><title>Google Drive - Virus scan "
                             f"warning</title>{form}</html>".encode(), "text/html")
        if path == "/uc" or confirmed:
            return self.send(h, self.files[file_id], "application/octet-stream")
        h.send_error(403)

    @staticmethod
    def send(h, body, content_type):
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def drive(monkeypatch):
    """A FakeDrive in place of Google Drive (no test reaches the real one), and no
    waits between retries."""
    fake = FakeDrive()
    monkeypatch.setattr(prepare, "DRIVE_DOWNLOAD", fake.url + "/uc?export=download&id={}")
    monkeypatch.setattr(clip.clip, "RETRY_DELAY", 0)  # refused connections fail at once
    yield fake
    fake.close()


def jpeg_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, "JPEG")
    return buf.getvalue()


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def eurosat_zip(path):
    """Zenodo's EuroSAT_RGB.zip layout (EuroSAT_RGB/<class>/...), with the __MACOSX/
    folder some zips carry."""
    with zipfile.ZipFile(path, "w") as z:
        for rel in ("EuroSAT_RGB/Forest/Forest_1.jpg", "EuroSAT_RGB/River/River_1.jpg"):
            z.writestr(rel, jpeg_bytes())
        z.writestr("__MACOSX/EuroSAT_RGB/._Forest", b"resource fork")


EUROSAT_SPLIT = {"train": [["Forest/Forest_1.jpg", 0, "Forest"]], "val": [],
                 "test": [["River/River_1.jpg", 1, "River"]]}


def test_prepare_zip_then_split_file_from_drive(server, drive, tmp_path, monkeypatch, capsys):
    served, url = server
    eurosat_zip(served / "EuroSAT_RGB.zip")
    entries = [sources.Download(f"{url}/EuroSAT_RGB.zip?download=1",
                                md5(served / "EuroSAT_RGB.zip"), "eurosat", "eurosat/2750",
                                ("eurosat/EuroSAT_RGB", "eurosat/2750")),
               sources.drive_file("split-id", "eurosat", "split_zhou_EuroSAT.json")]
    monkeypatch.setitem(sources.DOWNLOADS, "eurosat", entries)
    root = tmp_path / "root"

    # Drive does not have the split file (404)
    assert prepare.main(["eurosat", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert (root / "eurosat" / "2750" / "River" / "River_1.jpg").is_file() and not (
        root / "__MACOSX"
    ).exists()
    assert not (root / "eurosat" / "__MACOSX").exists()
    assert not (root / "downloads" / "EuroSAT_RGB.zip").exists()  # removed after unpacking
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert (
        len(failed) == 1 and "eurosat/split_zhou_EuroSAT.json" in failed[0] and "404" in failed[0]
    )
    by_hand = out[out.index("To do by hand:"):]
    assert (
        f"put {root / 'eurosat' / 'split_zhou_EuroSAT.json'}" in by_hand
        and "drive.google.com/file/d/split-id/view" in by_hand
    )

    drive.files["split-id"] = json.dumps(EUROSAT_SPLIT).encode()
    assert prepare.main(["eurosat", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "eurosat/2750: already there" in out and "ok: 2 classes, 1 train, 0 val, 1 test" in out
    assert "Nothing to do by hand." in out
    assert json.loads((root / "eurosat" / "split_zhou_EuroSAT.json").read_text()) == EUROSAT_SPLIT


@pytest.mark.parametrize("page", ["form", "legacy"])
def test_large_drive_file_goes_through_the_confirm_page(drive, tmp_path, monkeypatch, page):
    """UCF101's frames are too large for Drive's virus scan: the first answer
    is a page, not the zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("UCF-101-midframes/Biking/v_Biking_g01_c01.jpg", jpeg_bytes())
    drive.files["frames-id"] = buf.getvalue()
    (drive.large if page == "form" else drive.legacy).add("frames-id")
    entry = sources.Download("drive:frames-id/UCF-101-midframes.zip", None, "ucf101",
                             "ucf101/UCF-101-midframes")
    prepare.fetch(entry, str(tmp_path))
    assert (
        tmp_path / "ucf101" / "UCF-101-midframes" / "Biking" / "v_Biking_g01_c01.jpg"
    ).read_bytes() == jpeg_bytes()
    assert not (tmp_path / "downloads" / "UCF-101-midframes.zip").exists()
    assert any("confirm=" in r for r in drive.requests)


def test_drive_quota_page_is_one_clear_line(drive, tmp_path, monkeypatch, capsys):
    drive.files["split-id"] = b"{}"
    drive.quota.add("split-id")
    monkeypatch.setitem(sources.DOWNLOADS, "dtd",
                        [sources.drive_file("split-id", "dtd",
                                            "split_zhou_DescribableTextures.json")])
    assert prepare.main(["dtd", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert ("FAILED dtd/split_zhou_DescribableTextures.json: RuntimeError: Google Drive did not "
            "serve the file (Google Drive - Quota exceeded;") in out
    assert not (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").exists()


def test_prepare_never_tracebacks(server, drive, tmp_path, monkeypatch, capsys):
    """A refused host, a checksum mismatch and a damaged archive: one line each, every data set
    still tried, and the list of what is left by hand at the end."""
    served, url = server
    (served / "dtd-r1.0.1.tar.gz").write_bytes(b"not a tar file")
    eurosat_zip(served / "EuroSAT_RGB.zip")
    dead = refused_url() + "caltech-101.zip"
    monkeypatch.setitem(sources.DOWNLOADS, "caltech101",
                        [sources.Download(dead, None, ".", "caltech-101/101_ObjectCategories")])
    monkeypatch.setitem(sources.DOWNLOADS, "dtd",
                        [sources.Download(f"{url}/dtd-r1.0.1.tar.gz", None, ".", "dtd/images")])
    wrong_md5 = sources.Download(f"{url}/EuroSAT_RGB.zip", "0" * 32, "eurosat", "eurosat/2750")
    monkeypatch.setitem(sources.DOWNLOADS, "eurosat", [wrong_md5])
    assert prepare.main(["caltech101", "dtd", "eurosat", "sun397", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    failed = [line.strip() for line in out.splitlines() if "FAILED" in line]
    # caltech101, dtd, eurosat and sun397's split file (not on the fake Drive)
    assert len(failed) == 4, out
    assert failed[0].startswith("FAILED caltech-101/101_ObjectCategories: RuntimeError: could "
                                "not download caltech-101.zip")
    assert failed[1].startswith("FAILED dtd/images: ReadError")
    assert failed[2].startswith("FAILED eurosat/2750: RuntimeError: md5 mismatch")
    by_hand = out[out.index("To do by hand:"):]
    for rel in ("caltech-101/101_ObjectCategories", "dtd/images", "eurosat/2750", "sun397/SUN397",
                "sun397/split_zhou_SUN397.json"):
        assert f"put {tmp_path / rel}" in by_hand
    assert dead in by_hand and "8ca2778205c41d23104230ba66911c7a" in by_hand
    assert not list((tmp_path / "downloads").glob("*.part"))  # the mismatching download was deleted


def test_published_checksums_are_recorded():
    """Every archive whose publisher lists an md5 (torchvision's dataset classes, the Caltech and
    Zenodo records) carries it; only the ones nobody publishes a checksum for go unchecked."""
    entries = [e for entries in sources.DOWNLOADS.values() for e in entries]
    unchecked = sorted(
        e.creates for e in entries if e.md5 is None and not str(e.url).startswith("drive:")
    )
    assert unchecked == ["fgvc_aircraft/images", "imagenet-adversarial/imagenet-a",
                         "imagenet-rendition/imagenet-r",
                         "imagenetv2/imagenetv2-matched-frequency-format-val"]
    assert all(re.fullmatch(r"[0-9a-f]{32}", e.md5) for e in entries if e.md5)
    assert sources.DOWNLOADS["caltech101"][0].url.startswith("https://data.caltech.edu/records/")
    assert sources.DOWNLOADS["eurosat"][0].url.startswith("https://zenodo.org/records/7711810/")


def test_prepare_tar_with_rename(server, tmp_path, monkeypatch):
    """FGVCAircraft ships as fgvc-aircraft-2013b/data/...; CoOp's layout wants that
    data/ as fgvc_aircraft/."""
    served, url = server
    files = {
        "variants.txt": b"707-320\n",
        "images_variant_train.txt": b"1025794 707-320\n",
        "images_variant_val.txt": b"1025795 707-320\n",
        "images_variant_test.txt": b"1025796 707-320\n",
    }
    files.update({f"images/{i}.jpg": jpeg_bytes() for i in (1025794, 1025795, 1025796)})
    with tarfile.open(served / "fgvc-aircraft-2013b.tar.gz", "w:gz") as t:
        for rel, blob in files.items():
            info = tarfile.TarInfo(f"fgvc-aircraft-2013b/data/{rel}")
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    entry = sources.Download(f"{url}/fgvc-aircraft-2013b.tar.gz", None, ".", "fgvc_aircraft/images",
                             ("fgvc-aircraft-2013b/data", "fgvc_aircraft"))
    monkeypatch.setitem(sources.DOWNLOADS, "fgvc_aircraft", [entry])
    root = tmp_path / "root"
    assert prepare.main(["fgvc_aircraft", "--root", str(root), "--keep-archives"]) == 0
    assert (root / "downloads" / "fgvc-aircraft-2013b.tar.gz").is_file()
    assert build_dataset("fgvc_aircraft", str(root)).classnames == ["707-320"]


def test_prepare_archive_inside_archive(server, tmp_path, monkeypatch):
    """Caltech's caltech-101.zip holds caltech-101/101_ObjectCategories.tar.gz,
    unpacked where it lies."""
    served, url = server
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        info = tarfile.TarInfo("101_ObjectCategories/ant/image_0001.jpg")
        info.size = len(jpeg_bytes())
        t.addfile(info, io.BytesIO(jpeg_bytes()))
    with zipfile.ZipFile(served / "caltech-101.zip", "w") as z:
        z.writestr("caltech-101/101_ObjectCategories.tar.gz", inner.getvalue())
        z.writestr("caltech-101/Annotations.tar", b"")
    entry = sources.Download(f"{url}/caltech-101.zip?download=1", md5(served / "caltech-101.zip"),
                             ".", "caltech-101/101_ObjectCategories",
                             inner="caltech-101/101_ObjectCategories.tar.gz")
    prepare.fetch(entry, str(tmp_path))
    assert (tmp_path / "caltech-101" / "101_ObjectCategories" / "ant" / "image_0001.jpg").is_file()
    assert not (tmp_path / "caltech-101" / "101_ObjectCategories.tar.gz").exists()


def test_download_checksum_mismatch(server, tmp_path):
    served, url = server
    (served / "x.zip").write_bytes(b"not what you expected")
    dst = tmp_path / "dl" / "x.zip"
    for kind, wrong in (("sha256", "0" * 64), ("md5", "0" * 32)):
        with pytest.raises(RuntimeError, match=f"{kind} mismatch"):
            prepare.download(f"{url}/x.zip", str(dst), **{kind: wrong})
        assert not dst.exists() and not (tmp_path / "dl" / "x.zip.part").exists()
    sha = hashlib.sha256(b"not what you expected").hexdigest()
    assert prepare.download(f"{url}/x.zip", str(dst), sha256=sha,
                            md5=md5(served / "x.zip")) == str(dst) and dst.is_file()


def test_unpack_refuses_escaping_members(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as t:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(tarfile.TarError):
        prepare.unpack(str(archive), str(tmp_path / "into"))
    assert not (tmp_path / "escaped.txt").exists()
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as z:
        z.writestr("../escaped.txt", "x")
    with pytest.raises(RuntimeError, match="outside"):
        prepare.unpack(str(tmp_path / "evil.zip"), str(tmp_path / "into"))


def test_prepare_manual_instructions(drive, tmp_path, capsys):
    drive.files["1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF"] = b"n01440764 tench\n"
    assert prepare.main(["imagenet", "stanford_cars", "sun397", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    by_hand = out[out.index("To do by hand:"):]
    for rel in ("imagenet/images/train", "imagenet/images/val", "stanford_cars/cars_train",
                # fmt: skip
                "stanford_cars/split_zhou_StanfordCars.json", "sun397/SUN397",
                "sun397/split_zhou_SUN397.json"):
        assert f"put {tmp_path / rel}" in by_hand
    # fetched from (fake) Drive
    assert (tmp_path / "imagenet" / "classnames.txt").read_bytes() == b"n01440764 tench\n"
    assert (
        "image-net.org" in by_hand
        and "valprep" in by_hand
        and "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT" in by_hand
    )
    with pytest.raises(SystemExit):
        prepare.main(["imagenett", "--root", str(tmp_path)])


def test_toy_refuses_a_folder_it_did_not_draw(tmp_path):
    os.makedirs(tmp_path / "toy" / "mine")
    with pytest.raises(ValueError, match="not a toy world"):
        build_dataset("toy", str(tmp_path))
    assert os.listdir(tmp_path / "toy") == ["mine"]  # untouched
