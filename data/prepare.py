"""Download and unpack the data sets into CoOp's layout, or say exactly which files to put where.

    python -m data.prepare eurosat dtd --root $DATA

Fetched with a progress line, resumably: the archives with a public URL (CoOp's DATASETS.md, with
the links that moved updated: Caltech101 is on data.caltech.edu, EuroSAT on Zenodo, ImageNetV2 on
Hugging Face), and from Google Drive CoOp's split_zhou_*.json files, UCF101's frames and ImageNet's
class names. An archive whose publisher lists an md5 (torchvision's dataset classes, the Caltech and
Zenodo records) keeps its name only if it matches; the others (FGVC Aircraft, ImageNetV2,
ImageNet-A/R, the Drive files) are checked only by unpacking them and reading the data set. What no
script can fetch (ImageNet needs a login; the Stanford Cars and SUN397 links are dead) is listed
with the path each file must end up at and where to get it. A file that fails is one line of output,
and the rest is still tried; the list of what is left to do by hand always ends the output.
"""
import argparse
import html
import os
import re
import shutil
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile
from collections import namedtuple

from clip.clip import TIMEOUT, download  # the one downloader: resumable, retried, checksum-checked
from data.datasets import DATASETS, DatasetNotFound, build_dataset

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
DRIVE_DOWNLOAD = "https://drive.google.com/uc?export=download&id={}"


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


# -----------------------------------------------------------------------------
# Google Drive: the link that serves a file


def drive_url(file_id):
    """The URL that serves a Drive file: uc?export=download&id=..., or for a file too
    large for Drive's virus scan (it answers with a "download anyway" page instead), the
    URL that page's form submits."""
    url = DRIVE_DOWNLOAD.format(file_id)
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        if response.headers.get_content_type() != "text/html":
            return url  # the file itself: download() fetches it again, resumably
        text = response.read(1 << 20).decode("utf-8", "replace")
    form = re.search(r"<form\b[^>]*\baction=\"([^\"]+)\"[^>]*>(.*?)</form>", text, re.S)
    if form:  # today's page: a GET form with hidden id, export, confirm and uuid fields
        fields = re.findall(
            r"<input\b[^>]*\btype=\"hidden\"[^>]*\bname=\"([^\"]+)\"[^>]*\bvalue=\"([^\"]*)\"",
            form[2],
        )
        query = urllib.parse.urlencode([(k, html.unescape(v)) for k, v in fields])
        return urllib.parse.urljoin(url, html.unescape(form[1])) + "?" + query
    link = re.search(r"href=\"(/uc\?export=download[^\"]*confirm=[^\"]+)\"", text)
    if link:  # the older page: a link carrying a confirm token
        return urllib.parse.urljoin(url, html.unescape(link[1]))
    title = re.search(r"<title>(.*?)</title>", text, re.S)
    said = html.unescape(title[1]).strip() if title else "no file, no form"
    raise RuntimeError(f"Google Drive did not serve the file ({said}; over its "
                       f"download quota, or not shared)")


# -----------------------------------------------------------------------------
# unpack what clip.clip.download fetched


def unpack(archive, into):
    """Unpack a .tar(.gz)/.tgz/.zip into `into`, refusing members that would land outside it
    (and leaving out the __MACOSX/ resource forks some zips carry)."""
    os.makedirs(into, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.namelist() if not m.startswith("__MACOSX/")]
            for member in members:
                if not os.path.realpath(os.path.join(into, member)).startswith(
                    os.path.realpath(into) + os.sep
                ):
                    raise RuntimeError(f"{archive}: member {member} "
                                       f"would be written outside {into}")
            z.extractall(into, members)
    else:
        with tarfile.open(archive) as t:
            t.extractall(into, filter="data")  # "data" refuses absolute paths, .. and device files


def fetch(entry, root, keep=False):
    """Download one entry (and unpack it if it is an archive) unless what it creates is there."""
    if os.path.exists(os.path.join(root, entry.creates)):
        print(f"  {entry.creates}: already there")
        return
    urls = [entry.url] if isinstance(entry.url, str) else list(entry.url)
    name = file_name(urls[0])
    if urls[0].startswith("drive:"):
        urls = [drive_url(urls[0][len("drive:"):].split("/")[0])]
    into = os.path.join(root, entry.into)
    if not name.endswith(ARCHIVES):  # a plain file (e.g. imagelabels.mat, a split file)
        download(urls, os.path.join(into, name), md5=entry.md5)
        return
    archive = download(urls, os.path.join(root, "downloads", name), md5=entry.md5)
    print(f"  unpacking {name} into {into}")
    unpack(archive, into)
    if entry.inner:
        inner = os.path.join(root, entry.inner)
        print(f"  unpacking {entry.inner}")
        unpack(inner, os.path.dirname(inner))
        os.remove(inner)
    if entry.move:
        shutil.move(os.path.join(root, entry.move[0]), os.path.join(root, entry.move[1]))
    if not keep:
        os.remove(archive)


def one_line(error):
    """An exception as one line: its type and its message's lines joined ("could not download x:
    url1: ...; url2: ...")."""
    first, *rest = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    return (
        f"{type(error).__name__}: {first}{' ' if first.endswith(':') else '; '}{'; '.join(rest)}"
        if rest
        else f"{type(error).__name__}: {first}"
    )


def prepare(name, root, keep=False):
    """Fetch what can be fetched for one data set; return (readable, {path: where
    to get it} left to do)."""
    print(f"{name}:")
    todo = {}
    for entry in DOWNLOADS.get(name, []):
        try:
            fetch(entry, root, keep)
        # network, checksum, disk, archive: each is one line, then the next file
        except Exception as e:  # noqa: BLE001
            print(f"  FAILED {entry.creates}: {one_line(e)}")
            todo[entry.creates] = page(entry)
    todo.update(
        {
            rel: source
            for rel, source in MANUAL.get(name, {}).items()
            if not os.path.exists(os.path.join(root, rel))
        }
    )
    try:
        ds = build_dataset(name, root)
        print(f"  ok: {len(ds.classnames)} classes, {len(ds.train)} train, "
              f"{len(ds.val)} val, {len(ds.test)} test")
        return True, todo
    except DatasetNotFound as err:
        if not todo:
            print(f"  not readable yet: {err}")
    # a damaged file among the downloads: say so, go on with the next data set
    except Exception as e:  # noqa: BLE001
        print(f"  not readable: {one_line(e)}")
    return False, todo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", help=f"any of: {', '.join(DATASETS)}, or all")
    parser.add_argument("--root", default=os.environ.get("DATA"), help="data root (default: $DATA)")
    parser.add_argument("--keep-archives", action="store_true",
                        help="keep the downloaded archives in ROOT/downloads")
    args = parser.parse_args(argv)
    if not args.root:
        parser.error("no data root: pass --root DIR or set $DATA")
    names = list(DATASETS) if args.datasets == ["all"] else args.datasets
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(DATASETS)}")
    root = os.path.abspath(os.path.expanduser(args.root))
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        parser.error(f"cannot create the data root {root}: {e.strerror}")
    ready, todo = [], {}
    for name in names:
        ok, left = prepare(name, root, args.keep_archives)
        ready.append(ok)
        todo.update({os.path.join(root, rel): source for rel, source in left.items()})
    print("\nTo do by hand:" if todo else "\nNothing to do by hand.")
    for path, source in todo.items():
        print(f"  put {path}\n      <- {source}")
    return 0 if all(ready) else 1


if __name__ == "__main__":
    sys.exit(main())
