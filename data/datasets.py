"""The 15 benchmark data sets of CoOp/CoCoOp/MaPLe, read from CoOp's folder layout (its
DATASETS.md), and the built-in toy world (data/toy.py).

Everything a reader needs is in one plain table, DATASETS, at the bottom: no registry, no
decorators. Every reader returns lists of Datum(impath, label, classname) with absolute paths.

Labels and class names come from the same files as in CoOp, so that a few-shot draw
(data/fewshot.py) picks the same images. Where CoOp ships a split file (split_zhou_*.json) it is
required here: it fixes which image is train, val or test, and CoOp only falls back to its own
random split when the file is missing. ImageNet and its variants have no split file: CoOp lists the
files of each class folder in os.listdir order, which depends on the filesystem; they are sorted
here, so the listing (and a few-shot draw from it) is the same on every machine, and equals CoOp's
wherever its listing came out sorted.
"""
import json
import os
import random
from collections import namedtuple
from dataclasses import dataclass

from clip.files import load_json
from data.sources import source_of

Datum = namedtuple("Datum", "impath label classname")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# train, val fractions for a folder without split.json; the rest (0.3) is test
FOLDER_SPLIT = (0.5, 0.2)
# fixed, so the automatic split of a folder is the same on every run and machine
FOLDER_SPLIT_SEED = 0


class DatasetNotFound(ValueError):
    """A data set's files are missing or not where CoOp's layout puts them."""


@dataclass
class Dataset:
    name: str
    classnames: list  # prompt-ready names, index = label
    template: str  # CoOp's hand-written prompt, e.g. "a photo of a {}."
    train: list  # list[Datum]; empty for the test-only ImageNet variants
    val: list
    test: list
    image_dir: str  # the folder the split file's paths are relative to (fewshot.json uses it too)


def prompt_name(classname):
    # Every CoOp trainer does name.replace("_", " ") before building prompts; this is the
    # one place it happens here.
    return classname.replace("_", " ")


def duplicate_classnames(*lists):
    """Groups of the lists' class names whose prompts CLIP reads the same: the names' token ids
    are compared, so the tokenizer's own cleaning decides ("Cat"/"cat", "a_b"/"a b", NFC/NFD
    "café", fullwidth "ｃａｔ"/"cat"). Such classes get identical features, so one of them is
    never predicted."""
    from clip.tokenizer import default_tokenizer  # lazy: only the runs that read data need it

    encode = default_tokenizer().encode
    names, groups = {}, {}
    for items in lists:
        for item in items:
            names.setdefault(item.label, item.classname)
    for label in sorted(names):
        ids = tuple(encode(prompt_name(names[label]), limit=77))  # what fits in a prompt
        groups.setdefault(ids, []).append(names[label])
    return [group for group in groups.values() if len(group) > 1]


def classnames_of(*lists):
    """Prompt-ready class names in label order, from the (label, classname)
    pairs of the given lists."""
    names = {}
    for items in lists:
        for item in items:
            names.setdefault(item.label, item.classname)
    return [prompt_name(names[label]) for label in sorted(names)]


# -----------------------------------------------------------------------------
# errors that say what is missing, where we looked, and how to get it


def not_found(name, root, path, what):
    source = source_of(name, root, path)
    where = f"\n  Get it from: {source}" if source else ""
    return DatasetNotFound(
        f"{name}: {what} not found: {path}{where}\n"
        f"  `python -m data.prepare {name} --root {root}` downloads what has a public URL and "
        f"lists where to put the rest."
    )


def need_file(name, root, path, what):
    if not os.path.isfile(path):
        raise not_found(name, root, path, what)


def need_dir(name, root, path, what):
    if not os.path.isdir(path):
        raise not_found(name, root, path, what)


def need_images(name, items, listed_in):
    """Fail early, naming files, if the images a split lists are not on disk (CoOp's
    Datum asserts the same)."""
    missing = [item.impath for item in items if not os.path.isfile(item.impath)]
    if missing:
        raise DatasetNotFound(
            f"{name}: {len(missing)} of the {len(items)} images listed in {listed_in} are missing, "
            f"e.g. {missing[0]}\n  The images are probably extracted to another "
            f"folder than the layout expects."
        )


# -----------------------------------------------------------------------------
# file helpers


def subdirs(path):
    """The class folders in `path`, sorted. Hidden ones (".name") are skipped, as CoOp's
    listdir_nohidden does (.git, .ipynb_checkpoints, .Trash are no classes); one that holds
    images is named in a note, since it may be a class hidden by mistake."""
    entries = [e for e in os.scandir(path) if e.is_dir()]
    for e in sorted(entries, key=lambda e: e.name):
        if e.name.startswith(".") and files(e.path, IMAGE_EXTS):
            print(f"note: skipping the hidden folder {e.path} (it holds images); rename it "
                  f"without the leading '.' if it is a class")
    return sorted(e.name for e in entries if not e.name.startswith("."))


def files(path, exts=None):
    # CoOp lists with os.listdir (filesystem order); sorted here so a listing is
    # the same on every machine.
    names = (e.name for e in os.scandir(path) if e.is_file() and not e.name.startswith("."))
    return sorted(n for n in names if exts is None or n.lower().endswith(exts))


def datums(rows, image_dir):
    """Rows [path relative to image_dir, label, classname], already checked by read_rows ->
    list[Datum]."""
    return [Datum(os.path.join(image_dir, rel), label, cname) for rel, label, cname in rows]


def check_row(row, image_dir):
    """What is wrong with one row [path relative to image_dir, label, class name], or None."""
    if not isinstance(row, list) or len(row) != 3:
        return "a row must be [image path, label, class name]"
    rel, label, cname = row
    if not isinstance(rel, str) or not rel.strip():
        return "the image path must be a non-empty string"
    inside = os.path.normpath(os.path.join(image_dir, rel))
    if os.path.isabs(rel) or not inside.startswith(os.path.normpath(image_dir) + os.sep):
        return f"the image path is outside the image folder {image_dir}"
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        return "the label must be an integer >= 0"
    if not isinstance(cname, str) or not cname.strip():
        return "the class name must be a non-empty string"
    return None


def read_rows(path, image_dir, keys, what, fix, contiguous=True):
    """The one reader of split files (split_zhou_*.json, a folder's split.json) and fewshot.json:
    {key: [[path relative to image_dir, label, class name], ...]} -> one list of Datum per key.

    Every row is checked, and across rows one name per label and one label per name; with
    `contiguous` the labels must be 0..n-1 (class names are looked up by label). A ValueError
    names the file, the row and what is wrong, and ends with `fix`."""
    content = load_json(path, what, fix)
    if not isinstance(content, dict) or not all(k in content for k in keys):
        has = sorted(content) if isinstance(content, dict) else f"a JSON {type(content).__name__}"
        raise ValueError(f"{path} is not a valid {what}: it needs an object with the keys "
                         f"{', '.join(keys)}; it has {has}. {fix}")
    name_of, label_of, lists = {}, {}, []
    for key in keys:
        if not isinstance(content[key], list):
            raise ValueError(f"{path}: {key!r} must be a list of [image path, label, class name] "
                             f"rows, not a JSON {type(content[key]).__name__}. {fix}")
        for i, row in enumerate(content[key]):
            problem = check_row(row, image_dir)
            if problem is None:
                _, label, cname = row
                if name_of.setdefault(label, cname) != cname:
                    problem = f"label {label} is also named {name_of[label]!r}"
                elif label_of.setdefault(cname, label) != label:
                    problem = f"class {cname!r} also has the label {label_of[cname]}"
            if problem:
                raise ValueError(f"{path}: row {i} of {key!r}, {json.dumps(row)[:200]}: "
                                 f"{problem}. {fix}")
        lists.append(datums(content[key], image_dir))
    missing = sorted(set(range(len(name_of))) - set(name_of))
    if contiguous and missing:
        raise ValueError(f"{path}: the labels must be 0..{len(name_of) - 1}, one per class, but "
                         f"{', '.join(map(str, missing[:5]))} "
                         f"{'is' if len(missing) == 1 else 'are'} missing (the largest used: "
                         f"{max(name_of)}). {fix}")
    return lists


def read_split(path, image_dir):
    """CoOp's split file:
    {"train"|"val"|"test": [[path relative to image_dir, label, classname], ...]}."""
    return read_rows(path, image_dir, ("train", "val", "test"), "split file",
                     "Restore the file, or fix it by hand.")


def read_classnames(path):
    """ImageNet's classnames.txt (CoOp's): 'n01440764 tench' per line -> {wnid: class name}, in
    file order; a ValueError naming the file and line if one is not that."""
    fix = "Restore it: `python -m data.prepare imagenet` fetches CoOp's copy."
    names = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a class list (not UTF-8 text: {err}). {fix}") from None
    for number, line in enumerate(lines, 1):
        wnid, _, cname = line.strip().partition(" ")
        if not wnid:
            continue
        problem = ("it has no class name after the WordNet id" if not cname.strip() else
                   f"{wnid} is also on line {list(names).index(wnid) + 1}" if wnid in names
                   else None)
        if problem:
            raise ValueError(f"{path}: line {number}, {line[:100]!r}: {problem}; each line must "
                             f"be 'nXXXXXXXX class name'. {fix}")
        names[wnid] = cname.strip()
    return names


# -----------------------------------------------------------------------------
# readers: reader(name, root, spec) -> (train, val, test, image_dir)


def read_split_dataset(name, root, spec):
    """The ten data sets that ship a split_zhou_*.json; paths in it are
    relative to spec.image_dir."""
    dataset_dir = os.path.join(root, spec.folder)
    need_dir(name, root, dataset_dir, "dataset folder")
    split_path = os.path.join(dataset_dir, spec.split_file)
    need_file(name, root, split_path, "split file")
    # Cars: the dataset folder itself
    image_dir = os.path.normpath(os.path.join(dataset_dir, spec.image_dir))
    need_dir(name, root, image_dir, "image folder")
    train, val, test = read_split(split_path, image_dir)
    need_images(name, train + val + test, split_path)
    return train, val, test, image_dir


def read_aircraft(name, root, spec):
    """FGVCAircraft: labels are line numbers in variants.txt; the official
    images_variant_{split}.txt lists."""
    dataset_dir = os.path.join(root, spec.folder)
    need_dir(name, root, dataset_dir, "dataset folder")
    variants_path = os.path.join(dataset_dir, spec.split_file)
    need_file(name, root, variants_path, "class list")
    with open(variants_path) as f:
        variants = [line.strip() for line in f if line.strip()]
    label_of = {v: i for i, v in enumerate(variants)}
    image_dir = os.path.join(dataset_dir, spec.image_dir)
    need_dir(name, root, image_dir, "image folder")

    splits = []
    for split in ("train", "val", "test"):
        path = os.path.join(dataset_dir, f"images_variant_{split}.txt")
        need_file(name, root, path, "split list")
        items = []
        with open(path) as f:
            for line in f:
                imname, _, variant = line.strip().partition(" ")  # "1025794 707-320"
                if not imname:
                    continue
                if variant not in label_of:
                    raise ValueError(f"{name}: variant {variant!r} in "
                                     f"{path} is not in {variants_path}")
                items.append(Datum(os.path.join(image_dir, imname + ".jpg"), label_of[variant],
                                   variant))
        need_images(name, items, path)
        splits.append(items)
    return (*splits, image_dir)


def find_classnames(name, root, spec):
    # CoOp copies ImageNet's classnames.txt into each variant's folder; fall
    # back to ImageNet's own copy.
    own, imagenet = os.path.join(root, spec.folder, "classnames.txt"), os.path.join(
        root, "imagenet", "classnames.txt"
    )
    for path in (own, imagenet):
        if os.path.isfile(path):
            return read_classnames(path)
    also = f" (nor at {imagenet})" if own != imagenet else ""
    raise not_found(name, root, own, f"ImageNet's classnames.txt{also}")


def read_wnid_folders(name, root, folder, classnames, what, wnids=None):
    """Images in one sub-folder per WordNet id, and the sorted folder names; label = index of
    the folder in sorted order (as CoOp). `wnids`: the class folders this split must have, as
    another split of the data set (each split's own listing would shift every label after a
    missing folder)."""
    need_dir(name, root, folder, what)
    found = subdirs(folder)
    if not found:
        raise DatasetNotFound(
            f"{name}: {folder} has no class sub-folders (nXXXXXXXX/). "
            "For ImageNet's val set, sort the 50,000 flat files into "
            "class folders first (valprep.sh)."
        )
    if wnids is not None and found != wnids:
        lack, extra = sorted(set(wnids) - set(found)), sorted(set(found) - set(wnids))
        said = [f"lacks {len(lack)} class folder(s) the other split has: {', '.join(lack[:5])}"
                ] * bool(lack) + [f"has {len(extra)} the other split lacks: "
                                  f"{', '.join(extra[:5])}"] * bool(extra)
        raise DatasetNotFound(f"{name}: {folder} {'; and '.join(said)}. Every split needs the "
                              f"same classes (labels are folder positions); restore the folders.")
    items = []
    for label, wnid in enumerate(found):
        if wnid not in classnames:
            raise DatasetNotFound(f"{name}: folder {os.path.join(folder, wnid)} is "
                                  f"not a class in classnames.txt")
        class_dir = os.path.join(folder, wnid)
        items += [Datum(os.path.join(class_dir, f), label,
                        classnames[wnid]) for f in files(class_dir)]
    return items, found


def read_imagenet(name, root, spec):
    # CoOp evaluates on the val set and also uses it as "val" (the
    # last-epoch model is tested anyway).
    image_dir = os.path.join(root, spec.folder, spec.image_dir)
    need_dir(name, root, image_dir, "image folder")
    classnames = find_classnames(name, root, spec)
    train, wnids = read_wnid_folders(name, root, os.path.join(image_dir, "train"), classnames,
                                     "train folder")
    test, _ = read_wnid_folders(name, root, os.path.join(image_dir, "val"), classnames,
                                "val folder", wnids)
    return train, test, test, image_dir


def read_imagenet_variant(name, root, spec):
    """ImageNet-Sketch/-A/-R: test only. -A and -R have 200 folders, relabelled
    0..199 in sorted order."""
    image_dir = os.path.join(root, spec.folder, spec.image_dir)
    need_dir(name, root, image_dir, "image folder")
    classnames = find_classnames(name, root, spec)
    test, _ = read_wnid_folders(name, root, image_dir, classnames, "image folder")
    return [], [], test, image_dir


def read_imagenetv2(name, root, spec):
    """ImageNetV2 names its folders 0..999 by ImageNet label; the label's wnid is line
    `label` of classnames.txt."""
    image_dir = os.path.join(root, spec.folder, spec.image_dir)
    need_dir(name, root, image_dir, "image folder")
    classnames = list(find_classnames(name, root, spec).values())
    items = []
    for label, cname in enumerate(classnames):
        class_dir = os.path.join(image_dir, str(label))
        need_dir(name, root, class_dir, f"folder of class {label}")
        items += [Datum(os.path.join(class_dir, f), label, cname) for f in files(class_dir)]
    return [], [], items, image_dir


def read_folder(path):
    """Your own data: one sub-folder per class (name = folder name), optional
    split.json in split_zhou format.

    Without split.json every class is shuffled with random.Random(FOLDER_SPLIT_SEED) and
    cut 50/20/30 into train/val/test with CoOp's rounding (round(0.5 n), round(0.2 n),
    rest), so the split never changes.
    """
    name = f"folder:{path}"
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise DatasetNotFound(f"{name}: folder not found: {path}. Expected one "
                              f"sub-folder of images per class.")
    split_path = os.path.join(path, "split.json")
    if os.path.isfile(split_path):
        train, val, test = read_split(split_path, path)
        need_images(name, train + val + test, split_path)
        return train, val, test, path

    classes = subdirs(path)
    if not classes:
        raise DatasetNotFound(f"{name}: no class sub-folders in {path}. Expected "
                              f"{path}/<class name>/<image files>.")
    rng = random.Random(FOLDER_SPLIT_SEED)
    train, val, test = [], [], []
    for label, cname in enumerate(classes):
        images = [os.path.join(path, cname, f) for f in files(os.path.join(path, cname),
                                                              IMAGE_EXTS)]
        if not images:
            raise DatasetNotFound(f"{name}: class folder {os.path.join(path, cname)} has no "
                                  f"images ({', '.join(IMAGE_EXTS)})")
        rng.shuffle(images)
        n_train, n_val = round(len(images) * FOLDER_SPLIT[0]), round(len(images) * FOLDER_SPLIT[1])
        if n_train == 0 or n_val == 0 or len(images) - n_train - n_val == 0:
            raise DatasetNotFound(
                f"{name}: class folder {os.path.join(path, cname)} has {len(images)} images, too "
                f"few for a 50/20/30 train/val/test split (at least 4 needed); add "
                f"images or write {split_path}"
            )
        train += [Datum(p, label, cname) for p in images[:n_train]]
        val += [Datum(p, label, cname) for p in images[n_train : n_train + n_val]]
        test += [Datum(p, label, cname) for p in images[n_train + n_val :]]
    return train, val, test, path


def read_toy(name, root, spec):
    """The built-in toy world (data/toy.py): drawn into root on first use, then read
    like any split data set."""
    # Imported here, not at the top: `python -m data.toy` loads the package, and so this module,
    # before it runs data/toy.py as __main__, which would then run twice (runpy warns). Not a
    # cycle: data/toy.py imports nothing from this module.
    from data.toy import ensure_world

    ensure_world(os.path.join(root, spec.folder))
    return read_split_dataset(name, root, spec)


# -----------------------------------------------------------------------------
# the table: dataset name -> where its files are and how to read them

Spec = namedtuple("Spec", "reader folder image_dir split_file template")
SPLIT, AIRCRAFT, IMAGENET, VARIANT, V2, TOY = (read_split_dataset, read_aircraft, read_imagenet,
                                               read_imagenet_variant, read_imagenetv2, read_toy)

DATASETS = {
    # name            reader    folder under root       image folder
    # split / class file                     CoOp's template (CUSTOM_TEMPLATES)
    "caltech101":     Spec(SPLIT, "caltech-101",          "101_ObjectCategories",
                           "split_zhou_Caltech101.json",          "a photo of a {}."),
    "oxford_pets":    Spec(SPLIT, "oxford_pets",          "images",
                           "split_zhou_OxfordPets.json",
                           "a photo of a {}, a type of pet."),
    "stanford_cars":  Spec(SPLIT, "stanford_cars",        "",
                           "split_zhou_StanfordCars.json",        "a photo of a {}."),
    "oxford_flowers": Spec(SPLIT, "oxford_flowers",       "jpg",
                           "split_zhou_OxfordFlowers.json",
                           "a photo of a {}, a type of flower."),
    "food101":        Spec(SPLIT, "food-101",             "images",
                           "split_zhou_Food101.json",             "a photo of {}, a type of food."),
    "fgvc_aircraft":  Spec(AIRCRAFT, "fgvc_aircraft",     "images",
                           "variants.txt",
                           "a photo of a {}, a type of aircraft."),
    "sun397":         Spec(SPLIT, "sun397",               "SUN397",
                           "split_zhou_SUN397.json",              "a photo of a {}."),
    "dtd":            Spec(SPLIT, "dtd",                  "images",
                           "split_zhou_DescribableTextures.json", "{} texture."),
    "eurosat":        Spec(SPLIT, "eurosat",              "2750",
                           "split_zhou_EuroSAT.json",
                           "a centered satellite photo of {}."),
    "ucf101":         Spec(SPLIT, "ucf101",               "UCF-101-midframes",
                           "split_zhou_UCF101.json",              "a photo of a person doing {}."),
    "imagenet":       Spec(IMAGENET, "imagenet",          "images",
                           "classnames.txt",                      "a photo of a {}."),
    "imagenetv2":     Spec(V2, "imagenetv2",              "imagenetv2-matched-frequency-format-val",
                           "classnames.txt",                      "a photo of a {}."),
    "imagenet_sketch": Spec(VARIANT, "imagenet-sketch",   "images",
                            "classnames.txt",                      "a photo of a {}."),
    "imagenet_a":     Spec(VARIANT, "imagenet-adversarial", "imagenet-a",
                           "classnames.txt",                      "a photo of a {}."),
    "imagenet_r":     Spec(VARIANT, "imagenet-rendition", "imagenet-r",
                           "classnames.txt",                      "a photo of a {}."),
    "toy":            Spec(TOY, "toy",                    "",
                           "split.json",                          "a photo of a {}."),
}  # fmt: skip
FOLDER_TEMPLATE = "a photo of a {}."


def build_dataset(name, root=None):
    """Read a data set by name (a key of DATASETS) from root (default $DATA), or
    "folder:/path/to/images"."""
    if name.startswith("folder:"):
        train, val, test, image_dir = read_folder(name[len("folder:") :])
        return Dataset(name, classnames_of(train, val, test), FOLDER_TEMPLATE, train, val, test,
                       image_dir)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: "
                         f"{', '.join(DATASETS)}, or folder:/path/to/images")
    root = root or os.environ.get("DATA")
    if not root:
        raise DatasetNotFound(f"{name}: no data root; pass --root DIR or set $DATA (see `python "
                              f"-m data.prepare {name} --root DIR`)")
    root = os.path.abspath(os.path.expanduser(root))
    spec = DATASETS[name]
    if spec.reader is not TOY:  # the toy world draws itself into a new root
        need_dir(name, root, root, "data root")
    train, val, test, image_dir = spec.reader(name, root, spec)
    return Dataset(name, classnames_of(train, val, test), spec.template, train, val, test,
                   image_dir)
