"""Download and unpack the data sets into CoOp's layout, or say exactly which files to put where.

    python -m data.prepare eurosat dtd --root $DATA

The archives with a public URL (CoOp's DATASETS.md) are fetched with a progress line, checked against a
sha256 where one is recorded, and unpacked. The rest can't be scripted: the split_zhou_*.json files are on
Google Drive, ImageNet needs a login, and the Stanford Cars and SUN397 links are dead. For those this
prints the path each file must end up at and the page to get it from. It ends by reading the data set.
"""
import argparse
import os
import shutil
import sys
import tarfile
import zipfile
from collections import namedtuple

from clip.clip import download  # the one downloader: resumable, retried, sha256-checked
from data.datasets import DATASETS, DatasetNotFound, build_dataset

# url, sha256 (None: not recorded), folder under root to unpack into, path under root that exists once done,
# and an optional (from, to) rename under root after unpacking
Download = namedtuple("Download", "url sha256 into creates move", defaults=(None,))
VGG = "https://www.robots.ox.ac.uk/~vgg/data"
DOWNLOADS = {
    "caltech101": [Download("http://www.vision.caltech.edu/Image_Datasets/Caltech101/101_ObjectCategories.tar.gz", None, "caltech-101", "caltech-101/101_ObjectCategories")],
    "oxford_pets": [
        Download(f"{VGG}/pets/data/images.tar.gz", None, "oxford_pets", "oxford_pets/images"),
        Download(f"{VGG}/pets/data/annotations.tar.gz", None, "oxford_pets", "oxford_pets/annotations"),
    ],
    "oxford_flowers": [
        Download(f"{VGG}/flowers/102/102flowers.tgz", None, "oxford_flowers", "oxford_flowers/jpg"),
        Download(f"{VGG}/flowers/102/imagelabels.mat", None, "oxford_flowers", "oxford_flowers/imagelabels.mat"),
    ],
    "food101": [Download("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", None, ".", "food-101/images")],
    "fgvc_aircraft": [
        Download(f"{VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz", None, ".", "fgvc_aircraft/images", ("fgvc-aircraft-2013b/data", "fgvc_aircraft"))
    ],
    "dtd": [Download(f"{VGG}/dtd/download/dtd-r1.0.1.tar.gz", None, ".", "dtd/images")],
    "eurosat": [Download("http://madm.dfki.de/files/sentinel/EuroSAT.zip", None, "eurosat", "eurosat/2750")],
    "imagenetv2": [
        Download("https://s3-us-west-2.amazonaws.com/imagenetv2public/imagenetv2-matched-frequency.tar.gz", None, "imagenetv2", "imagenetv2/imagenetv2-matched-frequency-format-val")
    ],
    "imagenet_a": [Download("https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar", None, "imagenet-adversarial", "imagenet-adversarial/imagenet-a")],
    "imagenet_r": [Download("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", None, "imagenet-rendition", "imagenet-rendition/imagenet-r")],
}  # fmt: skip

# What no script can fetch: path under root -> where to get it. The split files are CoOp's (DATASETS.md).
DRIVE = "https://drive.google.com/file/d/{}/view"
CLASSNAMES = "ImageNet's classnames.txt (CLIP's names), from " + DRIVE.format("1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF")
MANUAL = {
    "caltech101": {"caltech-101/split_zhou_Caltech101.json": DRIVE.format("1hyarUivQE36mY6jSomru6Fjd-JzwcCzN")},
    "oxford_pets": {"oxford_pets/split_zhou_OxfordPets.json": DRIVE.format("1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs")},
    "stanford_cars": {
        "stanford_cars/cars_train/": "cars_train.tgz, unpacked (the official http://ai.stanford.edu/~jkrause/car196/ links are dead; "
        "use a mirror that keeps the original file names 00001.jpg..., see the thread in KaiyangZhou/CoOp issue #61)",
        "stanford_cars/cars_test/": "cars_test.tgz, unpacked (same mirrors as cars_train)",
        "stanford_cars/split_zhou_StanfordCars.json": DRIVE.format("1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT"),
    },
    "oxford_flowers": {"oxford_flowers/split_zhou_OxfordFlowers.json": DRIVE.format("1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT")},
    "food101": {"food-101/split_zhou_Food101.json": DRIVE.format("1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl")},
    "sun397": {
        "sun397/SUN397/": "SUN397.tar.gz, unpacked (from https://vision.princeton.edu/projects/2010/SUN/ ; the link is reported dead, "
        "look for a mirror of the original archive, folders SUN397/a/abbey/...)",
        "sun397/split_zhou_SUN397.json": DRIVE.format("1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"),
    },
    "dtd": {"dtd/split_zhou_DescribableTextures.json": DRIVE.format("1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x")},
    "eurosat": {"eurosat/split_zhou_EuroSAT.json": DRIVE.format("1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o")},
    "ucf101": {
        "ucf101/UCF-101-midframes/": "UCF-101-midframes.zip, unpacked, from " + DRIVE.format("10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O"),
        "ucf101/split_zhou_UCF101.json": DRIVE.format("1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"),
    },
    "imagenet": {
        "imagenet/images/train/": "ILSVRC2012 train, one folder per class (n01440764/...), from https://image-net.org (login)",
        "imagenet/images/val/": "ILSVRC2012 val sorted into the same class folders (the flat val files need valprep.sh)",
        "imagenet/classnames.txt": CLASSNAMES,
    },
    "imagenetv2": {"imagenetv2/classnames.txt": CLASSNAMES + " (or keep it at imagenet/classnames.txt)"},
    "imagenet_sketch": {
        "imagenet-sketch/images/": "ImageNet-Sketch, unpacked (1,000 folders n*), from https://github.com/HaohanWang/ImageNet-Sketch",
        "imagenet-sketch/classnames.txt": CLASSNAMES + " (or keep it at imagenet/classnames.txt)",
    },
    "imagenet_a": {"imagenet-adversarial/classnames.txt": CLASSNAMES + " (or keep it at imagenet/classnames.txt)"},
    "imagenet_r": {"imagenet-rendition/classnames.txt": CLASSNAMES + " (or keep it at imagenet/classnames.txt)"},
}  # fmt: skip


def source_of(name, root, path):
    """Where to get the file at `path` (used in the readers' error messages), or None."""
    rel = os.path.relpath(path, root).replace(os.sep, "/") if root else path
    for key, source in MANUAL.get(name, {}).items():
        if rel == key.rstrip("/") or rel.startswith(key):
            return source
    return None


# -----------------------------------------------------------------------------
# unpack what clip.clip.download fetched


def unpack(archive, into):
    """Unpack a .tar(.gz)/.tgz/.zip into `into`, refusing members that would land outside it."""
    os.makedirs(into, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                if not os.path.realpath(os.path.join(into, member)).startswith(os.path.realpath(into) + os.sep):
                    raise RuntimeError(f"{archive}: member {member} would be written outside {into}")
            z.extractall(into)
    else:
        with tarfile.open(archive) as t:
            t.extractall(into, filter="data")  # "data" refuses absolute paths, .. and device files


def fetch(entry, root, keep=False):
    if os.path.exists(os.path.join(root, entry.creates)):
        print(f"  {entry.creates}: already there")
        return
    name = os.path.basename(entry.url)
    into = os.path.join(root, entry.into)
    if not name.endswith((".tar", ".tar.gz", ".tgz", ".zip")):  # a plain file (e.g. imagelabels.mat)
        download(entry.url, os.path.join(into, name), entry.sha256)
        return
    archive = download(entry.url, os.path.join(root, "downloads", name), entry.sha256)
    print(f"  unpacking {name} into {into}")
    unpack(archive, into)
    if entry.move:
        shutil.move(os.path.join(root, entry.move[0]), os.path.join(root, entry.move[1]))
    if not keep:
        os.remove(archive)


def prepare(name, root, keep=False):
    print(f"{name}:")
    for entry in DOWNLOADS.get(name, []):
        fetch(entry, root, keep)
    todo = {rel: source for rel, source in MANUAL.get(name, {}).items() if not os.path.exists(os.path.join(root, rel))}
    for rel, source in todo.items():
        print(f"  put {os.path.join(root, rel)}\n      <- {source}")
    try:
        ds = build_dataset(name, root)
        print(f"  ok: {len(ds.classnames)} classes, {len(ds.train)} train, {len(ds.val)} val, {len(ds.test)} test")
        return True
    except DatasetNotFound as err:
        if not todo:
            print(f"  not readable yet: {err}")
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", help=f"any of: {', '.join(DATASETS)}, or all")
    parser.add_argument("--root", default=os.environ.get("DATA"), help="data root (default: $DATA)")
    parser.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives in ROOT/downloads")
    args = parser.parse_args(argv)
    if not args.root:
        parser.error("no data root: pass --root DIR or set $DATA")
    names = list(DATASETS) if args.datasets == ["all"] else args.datasets
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(DATASETS)}")
    root = os.path.abspath(os.path.expanduser(args.root))
    os.makedirs(root, exist_ok=True)
    ready = [prepare(name, root, args.keep_archives) for name in names]
    return 0 if all(ready) else 1


if __name__ == "__main__":
    sys.exit(main())
