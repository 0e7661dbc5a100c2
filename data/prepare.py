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

from clip.clip import TIMEOUT, download  # the one downloader: resumable, retried, checksum-checked
from data.datasets import DATASETS, DatasetNotFound, build_dataset
from data.sources import ARCHIVES, DOWNLOADS, MANUAL, file_name, page

DRIVE_DOWNLOAD = "https://drive.google.com/uc?export=download&id={}"


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
