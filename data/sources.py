"""Where each data set's files come from: DOWNLOADS, what data/prepare.py fetches, and MANUAL,
what a person has to fetch; source_of(path) names a file's source for the readers' errors.

A table apart from the downloader, so that data/datasets.py can say where a missing file comes from
and data/prepare.py, which reads the data sets it fetched, sits above both.
"""
import os
import urllib.parse
from collections import namedtuple

# url ("drive:ID/NAME" for a Google Drive file; a tuple: mirrors of one file), md5 as published
# (None: none is), folder under root to unpack into (a file that is not an archive is saved there),
# path under root that exists once done; optionally a (from, to) rename under root after unpacking,
# and an archive inside the archive (a path under root) to unpack where it lies.
Download = namedtuple("Download", "url md5 into creates move inner", defaults=(None, None))


def drive_file(file_id, folder, name):
    """A file CoOp shares on Google Drive, saved as folder/name under root."""
    return Download(f"drive:{file_id}/{name}", None, folder, f"{folder}/{name}")


VGG = "https://www.robots.ox.ac.uk/~vgg/data"
# ImageNet's classnames.txt (CLIP's names), as CoOp shares it
CLASSNAMES_ID = "1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF"
DOWNLOADS = {
    "caltech101": [
        Download("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip?download=1",
                 "3138e1922a9193bfa496528edbbc45d0", ".", "caltech-101/101_ObjectCategories",
                 inner="caltech-101/101_ObjectCategories.tar.gz"),
        drive_file("1hyarUivQE36mY6jSomru6Fjd-JzwcCzN", "caltech-101",
                   "split_zhou_Caltech101.json"),
    ],
    "oxford_pets": [
        Download(f"{VGG}/pets/data/images.tar.gz", "5c4f3ee8e5d25df40f4fd59a7f44e54c",
                 "oxford_pets", "oxford_pets/images"),
        Download(f"{VGG}/pets/data/annotations.tar.gz", "95a8c909bbe2e81eed6a22bccdf3f68f",
                 "oxford_pets", "oxford_pets/annotations"),
        drive_file("1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs", "oxford_pets",
                   "split_zhou_OxfordPets.json"),
    ],
    "stanford_cars": [drive_file("1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT", "stanford_cars",
                                 "split_zhou_StanfordCars.json")],
    "oxford_flowers": [
        Download(f"{VGG}/flowers/102/102flowers.tgz", "52808999861908f626f3c1f4e79d11fa",
                 "oxford_flowers", "oxford_flowers/jpg"),
        Download(f"{VGG}/flowers/102/imagelabels.mat", "e0620be6f572b9609742df49c70aed4d",
                 "oxford_flowers", "oxford_flowers/imagelabels.mat"),
        drive_file("1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT", "oxford_flowers",
                   "split_zhou_OxfordFlowers.json"),
    ],
    "food101": [
        Download("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                 "85eeb15f3717b99a5da872d97d918f87", ".", "food-101/images"),
        drive_file("1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl", "food-101", "split_zhou_Food101.json"),
    ],
    "fgvc_aircraft": [
        Download(f"{VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz", None, ".",
                 "fgvc_aircraft/images", ("fgvc-aircraft-2013b/data", "fgvc_aircraft"))
    ],
    "sun397": [drive_file("1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq", "sun397", "split_zhou_SUN397.json")],
    "dtd": [
        Download(f"{VGG}/dtd/download/dtd-r1.0.1.tar.gz", "fff73e5086ae6bdbea199a49dfb8a4c1", ".",
                 "dtd/images"),
        drive_file("1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x", "dtd",
                   "split_zhou_DescribableTextures.json"),
    ],
    "eurosat": [  # Zenodo's EuroSAT_RGB/ holds the same files as the old EuroSAT.zip's 2750/
        Download("https://zenodo.org/records/7711810/files/EuroSAT_RGB.zip?download=1",
                 "f46e308c4d50d4bf32fedad2d3d62f3b", "eurosat", "eurosat/2750",
                 ("eurosat/EuroSAT_RGB", "eurosat/2750")),
        drive_file("1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o", "eurosat", "split_zhou_EuroSAT.json"),
    ],
    "ucf101": [
        Download("drive:10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O/UCF-101-midframes.zip", None, "ucf101",
                 "ucf101/UCF-101-midframes"),
        drive_file("1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y", "ucf101", "split_zhou_UCF101.json"),
    ],
    "imagenet": [drive_file(CLASSNAMES_ID, "imagenet", "classnames.txt")],
    "imagenet_sketch": [drive_file(CLASSNAMES_ID, "imagenet-sketch", "classnames.txt")],
    "imagenetv2": [
        drive_file(CLASSNAMES_ID, "imagenetv2", "classnames.txt"),
        Download(("https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
                  "imagenetv2-matched-frequency.tar.gz",
                  "https://s3-us-west-2.amazonaws.com/imagenetv2public/"
                  "imagenetv2-matched-frequency.tar.gz"),
                 None, "imagenetv2", "imagenetv2/imagenetv2-matched-frequency-format-val")
    ],
    "imagenet_a": [
        Download("https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar", None,
                 "imagenet-adversarial", "imagenet-adversarial/imagenet-a"),
        drive_file(CLASSNAMES_ID, "imagenet-adversarial", "classnames.txt"),
    ],
    "imagenet_r": [
        Download("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", None,
                 "imagenet-rendition", "imagenet-rendition/imagenet-r"),
        drive_file(CLASSNAMES_ID, "imagenet-rendition", "classnames.txt"),
    ],
}  # fmt: skip
ARCHIVES = (".tar", ".tar.gz", ".tgz", ".zip")

# What no script can fetch: path under root -> where to get it.
MANUAL = {
    "stanford_cars": {
        "stanford_cars/cars_train/": "cars_train.tgz, unpacked (the official "
                                     "http://ai.stanford.edu/~jkrause/car196/ links are dead; "
        "use a mirror that keeps the original file names 00001.jpg..., see the thread in "
        "KaiyangZhou/CoOp issue #61)",
        "stanford_cars/cars_test/": "cars_test.tgz, unpacked (same mirrors as cars_train)",
    },
    "sun397": {
        "sun397/SUN397/": "SUN397.tar.gz, unpacked "
                          "(http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz is dead; "
                          "look for a "
        "mirror of the original archive, md5 8ca2778205c41d23104230ba66911c7a as torchvision "
        "lists it, folders SUN397/a/abbey/...)",
    },
    "imagenet": {
        "imagenet/images/train/": "ILSVRC2012 train, one folder per class (n01440764/...), from "
                                  "https://image-net.org (login)",
        "imagenet/images/val/": "ILSVRC2012 val sorted into the same class folders (the "
                                "flat val files need valprep.sh)",
    },
    "imagenet_sketch": {
        "imagenet-sketch/images/": "ImageNet-Sketch, unpacked (1,000 folders n*), from "
                                   "https://github.com/HaohanWang/ImageNet-Sketch",
    },
}  # fmt: skip
DRIVE_VIEW = "https://drive.google.com/file/d/{}/view"


def source_of(name, root, path):
    """Where to get the file at `path` (used in the readers' error messages), or None."""
    rel = os.path.relpath(path, root).replace(os.sep, "/") if root else path
    sources = {**{entry.creates: page(entry) for entry in DOWNLOADS.get(name, [])},
               **MANUAL.get(name, {})}
    for key, source in sources.items():
        if rel == key.rstrip("/") or rel.startswith(key.rstrip("/") + "/"):
            return source
    return None


def page(entry):
    """Where a person gets an entry's file: its URL, or for a Drive file the page that offers it."""
    url = entry.url if isinstance(entry.url, str) else entry.url[0]
    where = (
        DRIVE_VIEW.format(url[len("drive:") :].split("/")[0]) if url.startswith("drive:") else url
    )
    return f"{where} (unpacked)" if file_name(url).endswith(ARCHIVES) else where


def file_name(url):
    """The name a download is saved under: the URL path's last part ("drive:ID/NAME"
    parses as a path too)."""
    return urllib.parse.urlparse(url).path.rsplit("/", 1)[-1]
